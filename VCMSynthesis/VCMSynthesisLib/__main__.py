import sys

try:
    from VCMSynthesisLib.cli import main

    code = main()
except KeyboardInterrupt:  # Ctrl-C while the command starts (imports, parsing)
    print("cancelled while starting: nothing was written", file=sys.stderr)
    code = 130
raise SystemExit(code)
