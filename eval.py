"""Evaluate a checkpoint: ``python eval.py ckpt=PATH [eval.seq_lens=[512,1024]] [data=...]``.

Prints a table of perplexity at each context length (and HellaSwag accuracy with
``eval.hellaswag=path/to/hellaswag_val.jsonl``) and writes the same as JSON.
"""

import hydra


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg) -> None:
    from trainer.evaluate import run_eval

    run_eval(cfg)


if __name__ == "__main__":
    main()
