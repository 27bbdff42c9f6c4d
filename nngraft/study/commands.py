"""Study subcommands of the ``nngraft`` CLI; ``nngraft.cli`` imports this module as a plugin.

Each study command lives in its own module and registers itself on import with
:func:`nngraft.cli.registry.command`; import those modules here.
"""

from . import data_commands  # noqa: F401  (registers `nngraft data`)
from . import run_commands  # noqa: F401  (registers `nngraft run`, `sweep`, `plot`)
from . import localize_commands  # noqa: F401  (registers `nngraft localize`)
from . import attribute_commands  # noqa: F401  (registers `nngraft attribute`)
from . import finetune_commands  # noqa: F401  (registers `nngraft finetune`)
from . import donor_commands  # noqa: F401  (registers `nngraft donor`)
from . import bundle_commands  # noqa: F401  (registers `nngraft bundle`, `nngraft reproduce`)
