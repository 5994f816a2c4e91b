"""Reports for operators and auditors: `compliance` (fact-based PASS/FAIL checks), `foreign`
(BPF objects loaded behind loaderd's back), `forensics` (an incident bundle).

May import: observe and below. Not stage, apply, runtime or cli."""
