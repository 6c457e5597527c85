"""Examples of fusecache in use; `python -m examples.demo` (what `make demo` runs) is the runnable one."""
