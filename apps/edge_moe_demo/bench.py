"""What the live map costs: decode tokens/s with the app's live updates on and off, in one process, runs
alternating (on, off, on, off, ...) so drift in a shared machine hits both alike. Headless is fine.

    QT_QPA_PLATFORM=offscreen python -m edge_moe_demo.bench --model PKG -n 64 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_moe_demo.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="package directory (default: the packaged default model)")
    p.add_argument("--budget", default="50%")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="runs per setting (default 3)")
    p.add_argument("--prompt", help="prompt (default: the app's)")
    p.add_argument("--screenshot", metavar="PNG", help="save the window after the last live run")
    args = p.parse_args(argv)

    from PySide6.QtCore import QEventLoop
    from PySide6.QtWidgets import QApplication

    from .window import DemoWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = DemoWindow(args.model, budget=args.budget, max_new_tokens=args.max_new_tokens)
    if window.session is None:
        print(window.message.text(), file=sys.stderr)
        return 2
    if args.prompt:
        window.prompt.setPlainText(args.prompt)
    window.show()
    results: dict[bool, list[float]] = {True: [], False: []}
    frames: list[int] = []

    def run(live: bool) -> float:
        window.controls.live.setChecked(live)
        done, loop = {}, QEventLoop()
        window.run_finished.connect(lambda r: (done.update(r), loop.quit()))
        before = window.map.frames
        window.generate()
        loop.exec()
        window.run_finished.disconnect()
        if live:
            frames.append(window.map.frames - before - 1)  # less the idle frame shown after the run
        return done["decode_tps"]

    run(False)  # warm-up: first-run costs (page cache, ORT allocations) belong to neither setting
    for _ in range(args.runs):
        for live in (True, False):
            results[live].append(run(live))
    if args.screenshot:
        window.controls.live.setChecked(True)
        run(True)
        window.grab().save(args.screenshot)
    on, off = statistics.median(results[True]), statistics.median(results[False])
    print(f"model {window.session.path} ({window.session.layers} x {window.session.experts} experts), "
          f"budget {args.budget}, {args.max_new_tokens} tokens x {args.runs} runs each")
    print(f"live updates on : {on:7.1f} tokens/s  (runs: {', '.join(f'{v:.1f}' for v in results[True])}; "
          f"map frames per run: {frames})")
    print(f"live updates off: {off:7.1f} tokens/s  (runs: {', '.join(f'{v:.1f}' for v in results[False])})")
    print(f"cost of live updates: {100 * (1 - on / off):.1f}% of decode speed")
    window.close()
    window.deleteLater()
    del window
    return 0


if __name__ == "__main__":
    sys.exit(main())
