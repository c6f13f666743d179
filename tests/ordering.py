"""The order of modules within tests/e2e (and tests/serve), so that the package's shared server
(Ray cluster) starts once and never shares the machine with another server.

`server` (tests/e2e/conftest.py) is one `motionserve serve` for every e2e module that takes it
(a start is a Ray cluster and the whole app: tens of seconds). It is package-scoped: started by
the first test that asks, stopped after the package's last test. So the package's other modules
(servers of their own: test_shutdown.py, test_ingress_replicas.py, test_demo.py) run first, each
stopping its server at its end; then the modules on the shared server run, in
`PREFERRED_ORDER` where it names them. (SHARED maps a package to its shared fixture, so another
package can join by adding itself: tests/serve's `ray_cluster`, one local Ray for the modules
that deploy onto it, after test_ingress_shutdown.py, which starts a Ray of its own in this
process.)

Each module on the shared e2e server uses inputs (seeds, clips) no other module uses, so what
one module computes is never another's cache hit; the order only keeps the test that counts the
server's jobs in flight first and the fuzzer's generated requests last.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent
SHARED = {TESTS / "e2e": "server", TESTS / "serve": "ray_cluster"}
PREFERRED_ORDER = {
    "server": (
        "test_admission_bounds",  # counts every job in flight: first, on an unused server
        "test_http_jobs",
        "test_previews",
        "test_web_page",
        "test_fuzz",  # generated requests last
    ),
}


def uses_shared(item: pytest.Item, fixture: str) -> bool:
    """Whether the test takes the package's `fixture` (not a module's own of that name)."""
    module = getattr(item, "module", None)
    return fixture in getattr(item, "fixturenames", ()) and not hasattr(module, fixture)


def _rank(item: pytest.Item, fixture: str) -> tuple[int, int]:
    if not uses_shared(item, fixture):
        return (0, 0)
    preferred = PREFERRED_ORDER.get(fixture, ())
    name = Path(str(item.fspath)).stem
    if name in preferred:
        return (1, preferred.index(name))
    return (1, len(preferred) - 1 if preferred else 0)  # others: before the last preferred one


def order_packages(items: list[pytest.Item]) -> None:
    """Reorder, in place, the tests of each package in SHARED among themselves; every other
    test keeps its place. Whole modules move: a module's tests keep their order and stay
    together, and a module ranks as its first test does."""
    for package, fixture in SHARED.items():
        positions = [i for i, it in enumerate(items) if package in Path(str(it.fspath)).parents]
        chosen = [items[i] for i in positions]
        module_rank: dict[str, tuple[int, int]] = {}
        for item in chosen:
            module_rank.setdefault(str(item.fspath), _rank(item, fixture))
        chosen.sort(key=lambda item: module_rank[str(item.fspath)])  # stable sort
        for position, item in zip(positions, chosen, strict=True):
            items[position] = item
