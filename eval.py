"""Evaluate a checkpoint: ``python eval.py ckpt=PATH [eval.seq_lens=[512,1024]] [data=...]``.

Language models: a table of perplexity at each context length (and HellaSwag accuracy with
``eval.hellaswag=path/to/hellaswag_val.jsonl``). Image classifiers (EfficientViT): top-1,
top-5 and loss on ``data``'s validation set for the raw and the EMA weights, with parameter
count and image size. Both write the same as JSON.

Long context (``eval.task=long_ppl``): perplexity of long documents (PG-19, local files, the
Gutenberg val books) against context length, for the model's own attention and an ``attn=``
override on ``eval.swap_layers``, in one table (``trainer/long_eval.py``); also for a pretrained
transformers model without a checkpoint (``model=llm_hf model.hf_name=PATH``).
"""

import hydra


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg) -> None:
    from trainer.evaluate import run_eval

    run_eval(cfg)


if __name__ == "__main__":
    main()
