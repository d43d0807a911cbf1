"""The operator command line, ``python -m upgrade_handler`` (``teams-app-upgrader``).

One module per command or concern, each on top of the function's own code:

- :mod:`.worker`: receives from the upgrade queue and runs every message through
  :class:`~upgrade_handler.UpgradeHandler`, settling as the Functions host does;
- :mod:`.send`: validated upgrade requests onto the queue, with content-derived message ids;
- :mod:`.deadletters`: list, show and replay dead letters;
- :mod:`.direct`: one upgrade from the terminal, no queue;
- :mod:`.rollout`: a rollout's progress from the ledger, and waiting on it from a pipeline;
- :mod:`.demo`: all of the above against the local stand-ins;
- :mod:`.requests`, :mod:`.schema`, :mod:`.bus`, :mod:`.events`, :mod:`.options`, :mod:`.output`:
  what the commands share.

Nothing here is imported by ``function_app`` or by the package's ``__init__``: the function's
cold start never pays for the command line's dependencies (``rich``, ``jsonschema``).
"""
