"""Train a model: ``python train.py [hydra overrides]`` (see README and conf/)."""

import sys

import hydra


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    from trainer import run

    summary = run(cfg)
    if summary.get("exit_code"):
        sys.exit(summary["exit_code"])


if __name__ == "__main__":
    main()
