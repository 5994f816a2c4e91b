"""The fuzz runner (`python3 -m tests.fuzz`); see __main__.py."""
