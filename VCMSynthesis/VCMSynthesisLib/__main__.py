from VCMSynthesisLib.cli import main

raise SystemExit(main())
