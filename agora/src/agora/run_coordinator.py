"""Agora coordinator: the run's admission service over HTTP (OpenAPI at /docs).

Example:
    python3 -m agora.run_coordinator --config coordinator.yaml --port 8000
    python3 -m agora.run_coordinator --run_config llama-8b   # every other setting at its default
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="coordinator YAML (see agora.coordinator.config); without one, defaults apply and --run_config is needed")
    parser.add_argument("--run_config", default=None, help="the run config (path or shipped name) whose stages it admits to; "
                                                           "overrides the config's run_config")
    parser.add_argument("--host", default=None, help="overrides the config's host")
    parser.add_argument("--port", type=int, default=None, help="overrides the config's port; 0 picks a free one")
    parser.add_argument("--database", default=None, help="SQLAlchemy URL; overrides the config's database_url")
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"], help="uvicorn's log level (info logs every request)")
    args = parser.parse_args(argv)

    import uvicorn

    from agora.coordinator.app import create_app
    from agora.coordinator.config import CoordinatorConfigError, load_coordinator_config

    try:
        config = load_coordinator_config(args.config, {"host": args.host, "port": args.port, "database_url": args.database,
                                                       "run_config": args.run_config})
        app = create_app(config)
    except CoordinatorConfigError as e:
        print(e, file=sys.stderr)
        return 2
    # seeds check every DHT record against this key; it is public, the key file stays secret
    key = app.state.coordinator.signer.public_key
    # "=" keeps a key that starts with "-" (base64url) from being read as an option
    print(f"[COORDINATOR] Access tokens are signed with public key {key} (seeds: --coordinator_public_key={key})", flush=True)
    # uvicorn handles SIGINT/SIGTERM itself and runs the app's shutdown (database close) on the way out
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
