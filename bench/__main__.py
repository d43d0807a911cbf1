"""``python -m bench`` runs every benchmark at its default size; ``python -m bench NAME [options]`` one.

    python -m bench                      # all six, in the order below (about 12 minutes + fanout's ~25)
    python -m bench throughput --size 1000 --processes 4
    python -m bench coldstart --runs 7
    python -m bench footprint
    python -m bench soak --size 5000
    python -m bench fuzz --size 10000
    python -m bench fanout --size 20000 --seed 1
    python -m bench budget --counts 1,4,10,40 --sizes 1000,1000,2000,2400   # needs `make setup` (Azurite)

Figures go to the terminal and to bench/results/<name>.json. The comparisons need msgraph-sdk
(``.venv/bin/pip install -r bench/requirements.txt``); without it, pass --skip-sdk to
throughput and coldstart.
"""

from __future__ import annotations

import importlib
import sys
import time

#: Footprint before cold start: cold start runs each function in the environment footprint built.
ORDER = ("throughput", "footprint", "coldstart", "soak", "fuzz", "fanout", "budget")


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if argv and argv[0] not in ORDER:
        raise SystemExit(f"unknown benchmark {argv[0]!r}; one of: {', '.join(ORDER)}")
    chosen = [argv[0]] if argv else list(ORDER)
    for name in chosen:
        started = time.perf_counter()
        print(f"\n## {name}\n", flush=True)
        module = importlib.import_module(f"bench.{name}")
        module.main(argv[1:] if argv else [])
        print(f"\n({name}: {time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
