"""Entry point: `asyncproc [options]` runs the processor; `asyncproc demo|sim|bench|top|
run-batch|submit|collect|status|cancel` run the tools.

Exit status: 0 clean stop, 2 bad configuration (one line naming the option), 3 cannot boot,
1 internal error in the loop (what was held is put back first).
"""
from __future__ import annotations

import sys
from typing import List, Optional

TOOL_DEPENDENCIES = ("aiohttp", "tqdm")  # the tools extra
TOOLS = ("demo", "sim", "bench", "top", "run-batch", "submit", "collect", "status", "cancel")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        return _run_tool(argv[0], argv[1:])
    from asyncproc import config, logs

    try:
        settings = config.load_settings(argv)
    except config.ConfigError as exc:
        config.print_error(str(exc))
        return 2
    logs.configure(settings.operations.log_format, settings.operations.log_level)
    from asyncproc.supervisor import Supervisor

    return Supervisor(settings).run()


def _run_tool(name: str, argv: List[str]) -> int:
    try:
        return _tool(name, argv)
    except ModuleNotFoundError as exc:
        if exc.name not in TOOL_DEPENDENCIES:
            raise
        print(f"asyncproc {name}: needs {exc.name}, which the daemon does not install:"
              " pip install 'asyncproc[tools]'", file=sys.stderr)
        return 2


def _tool(name: str, argv: List[str]) -> int:
    if name == "sim":
        from asyncproc.tools import sim

        return sim.main(argv)
    if name == "top":
        from asyncproc.tools import top

        return top.main(argv)
    if name == "bench":
        from asyncproc.tools import bench

        return bench.main(argv)
    if name in ("run-batch", "submit", "collect", "status", "cancel"):
        from asyncproc.tools import batch

        return batch.main(name, argv)
    from asyncproc.tools import demo

    return demo.main(argv)


if __name__ == "__main__":
    sys.exit(main())
