"""Test-only plugin for training ranks, loaded through ``$SPARKTUNE_TRAIN_CALLBACKS``.

``train_secret_log:log_secrets`` runs inside each rank while its trainer is built and logs a
warning that carries ``$SPARKTUNE_TEST_SECRET`` (a credential, as a user's code or a library might
log one) beside text that is no secret, twice: through a logger with no handler of its own (so
through whatever prints the rank's warnings: its stderr) and through one that writes
``$SPARKTUNE_TEST_LOG_DIR/rank-N.log``. The library never imports this module.
"""

import logging
import os


def log_secrets(cfg, env):
    message = ("rank %d of %d reports %s", env.rank, env.world_size, os.environ["SPARKTUNE_TEST_SECRET"])
    logging.getLogger("sparktune.test.rank_secrets").warning(*message)

    folder = os.environ["SPARKTUNE_TEST_LOG_DIR"]
    os.makedirs(folder, exist_ok=True)
    to_file = logging.getLogger("sparktune.test.rank_secrets_file")
    to_file.propagate = False
    handler = logging.FileHandler(os.path.join(folder, f"rank-{env.rank}.log"), encoding="utf-8")
    to_file.addHandler(handler)
    try:
        to_file.warning(*message)
    finally:
        to_file.removeHandler(handler)
        handler.close()
    return None
