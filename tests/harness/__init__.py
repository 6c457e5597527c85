"""The test harness: everything fusecache is tested and measured against, and none of it shipped.

Owns the parts that stand in for a data centre on one machine: a tiny real
guest under QEMU TCG (`tinyguest`), emulated guests (`simguest`), a TCP delay
proxy (`delay_proxy`), a real NFS server in a network namespace
(`nfs_server`), hosts in network namespaces (`netns`) and the bounded wait
every test and benchmark uses (`waiting`). Tests, `bench/` and
`examples/demo.py` import it as `tests.harness.NAME`, run from the
repository root (pytest, `python -m bench.NAME`, `python -m examples.demo`);
the fusecache wheel holds only `fusecache/`.
"""
