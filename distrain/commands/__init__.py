"""One module per `distrain` subcommand; each exposes ``register(subparsers)``."""

CONFIG_HELP = "YAML config file"
OVERRIDES_HELP = "config overrides, e.g. train.steps=50"


def add_config_arguments(parser) -> None:
    """The CONFIG positional and the key=value overrides every config-driven command takes."""
    parser.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def needs_action(message: str):
    """The handler of a command group called without its action (``distrain ckpt``): a UsageError saying which."""
    def handler(args) -> int:
        # lazy: start-up: the CLI parser loads every command, the work loads on use
        from distrain.errors import UsageError

        raise UsageError(message)
    return handler
