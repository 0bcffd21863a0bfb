import signal
import sys

from VCMSynthesisLib import unsupported_python_message

if unsupported_python_message():  # before any module that an older Python cannot even parse
    print(f"error: {unsupported_python_message()}", file=sys.stderr)
    raise SystemExit(1)

try:
    from VCMSynthesisLib.cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C while the command starts (imports, parsing)
    print("cancelled while starting: nothing was written", file=sys.stderr)
    code = 130
# The command is over (its files are in place or not written); a signal during the interpreter's
# teardown (seconds with torch loaded) would only turn its exit code into a kill.
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
raise SystemExit(code)
