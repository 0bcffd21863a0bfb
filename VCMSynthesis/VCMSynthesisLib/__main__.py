import sys

from VCMSynthesisLib import unsupported_python_message

if unsupported_python_message():  # before any module that an older Python cannot even parse
    print(f"error: {unsupported_python_message()}", file=sys.stderr)
    raise SystemExit(1)

from VCMSynthesisLib.cli import main  # noqa: E402

raise SystemExit(main())
