"""Entry points: `python -m jobs.decompose ...` (for `ray job submit`) and the `unziplora` command."""
