"""One module per `tccp` subcommand; each exposes `add_arguments(parser)` and `main(args)`.

Command modules keep heavy imports (torch, mediapipe, av) inside `main`, so that
`tccp --help` and argument errors stay instant.
"""
