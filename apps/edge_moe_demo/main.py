"""`edge-moe-demo`: starts the app. Options for scripting it (CI screenshots, start-time measurement) too."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-moe-demo", description="Watch an MoE model run under a memory budget.")
    p.add_argument("--model", help="package directory (default: the packaged default model)")
    p.add_argument("--budget", default="50%", help="starting expert budget: bytes, 512MB, 2GiB or 40%% (default 50%%)")
    p.add_argument("--prompt", help="starting prompt")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64, help="new tokens per run (default 64)")
    p.add_argument("--screenshot", metavar="PNG", help="generate once, save a screenshot of the window, and quit")
    p.add_argument("--start-time", action="store_true",
                   help="print seconds from process start until the window is shown with the model loaded")
    return p


def qt_problem() -> str | None:
    """Why the installed PySide6 cannot run the app, or None. PySide6 6.12.0 drops a reference to None on
    void calls (QPainterPath.lineTo, QPainter.drawLine, ...); before Python 3.12, where None became immortal,
    that aborts the process within seconds of painting ("deallocating None")."""
    import PySide6
    if sys.version_info < (3, 12) and PySide6.__version__.startswith("6.12."):
        return (f"PySide6 {PySide6.__version__} crashes on Python {sys.version_info.major}."
                f"{sys.version_info.minor} (a refcount bug on None); install 'PySide6-Essentials<6.12'")
    return None


def display_problem() -> str | None:
    """Why Qt would abort for want of a screen (it exits 134 with an xcb message), or None."""
    if sys.platform != "linux" or os.environ.get("QT_QPA_PLATFORM"):
        return None
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    return ("no display (DISPLAY and WAYLAND_DISPLAY are unset); run it in a desktop session, or headless with "
            "QT_QPA_PLATFORM=offscreen and --screenshot PNG")


def _seconds_since_process_start() -> float:
    import psutil
    return time.time() - psutil.Process().create_time()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        from PySide6.QtCore import QTimer
        from PySide6.QtWidgets import QApplication
    except ImportError:
        print("edge-moe-demo needs PySide6: pip install 'edge-moe[demo]'", file=sys.stderr)
        return 2
    problem = qt_problem() or display_problem()
    if problem:
        print(f"edge-moe-demo: {problem}", file=sys.stderr)
        return 2
    from .window import DemoWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = DemoWindow(args.model, budget=args.budget, max_new_tokens=args.max_new_tokens)
    if args.prompt:
        window.prompt.setPlainText(args.prompt)
    window.show()
    app.processEvents()
    if args.start_time:
        print(f"start time: {_seconds_since_process_start():.2f} s (process start to window shown, model "
              "loaded)", file=sys.stderr)
    if args.screenshot:
        def save():
            window.grab().save(os.fspath(args.screenshot))
            app.quit()

        window.run_finished.connect(lambda _: QTimer.singleShot(300, save))
        if window.session is None:
            QTimer.singleShot(100, save)  # nothing to run: the screenshot shows the error
        else:
            window.generate()
    elif args.start_time and os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        return 0  # a timing run without a screen has nothing left to show
    code = app.exec()
    if args.screenshot and window.session is None:
        print(f"edge-moe-demo: error: {window.message.text().splitlines()[0]}", file=sys.stderr)
        code = 2  # the screenshot shows the error; the exit status says it too
    # The window goes before the QApplication: left to the interpreter's final GC, PySide6 may free them in the
    # wrong order and abort ("deallocating None").
    window.deleteLater()
    del window
    return code


if __name__ == "__main__":
    sys.exit(main())
