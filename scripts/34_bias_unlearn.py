"""Stage 34: BiasUnlearn (Liu et al. 2025, arXiv 2509.25673) on the pair data PCGU trains on (never StereoSet).

    python scripts/34_bias_unlearn.py --model embedded:smollm2-135m-instruct [--epochs 2]

LoRA on the model (``fairforget.methods.lora``), its adapter switched off as the frozen reference. Each step: NPO on
the stereotype-consistent (advantaged) sentences, cross-entropy on their anti-stereotype counterparts, KL to
the reference on those, weighted by --w-forget / --w-retain / --w-kl; every --check-every steps the pairs are
scored and forget / retain swap when the bias has reversed (``fairforget.methods.bias_unlearn``). The
adapter goes to --out; ``steps.csv``, ``swaps.csv`` and ``method.json`` (wall time, peak memory, pair gap
before and after, provenance) to --log-dir. With --settings-dir each epoch's adapter is saved too
(``<dir>/epochs_<e>``): BiasUnlearn's frontier along training.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fairforget.artifacts import write_csv
from fairforget.config import output_field, run_script, typed_config
from fairforget.errors import FairforgetError
from fairforget.flags import LoRAFlags, SettingsFlags
from fairforget.methods.lora import add_lora, save_adapter, target_modules
from fairforget.methods.bias_unlearn import BiasUnlearnConfig, Weights, check_sample, unlearn
from fairforget.methods.registry import save_method_config, write_method_record
from fairforget.methods.selection import save_epoch_setting, setting_name
from fairforget.models import DEFAULT_EMBEDDED, load_model
from fairforget.methods.pcgu import encode_pairs, pair_gap
from fairforget.winogender import read_pairs_tsv


@dataclass
class Config(SettingsFlags, LoRAFlags):
    model: str = DEFAULT_EMBEDDED
    pairs: Path = Path("data/processed/pairs.tsv")
    out: Path = output_field(Path("models/methods/bias_unlearn"), "adapter")
    log_dir: Path = output_field(Path("outputs/methods/bias_unlearn"), "method log")
    epochs: int = 2
    lr: float = 1e-4
    w_forget: float = 1.0
    w_retain: float = 1.0
    w_kl: float = field(default=1.0, metadata={"help": "weight of KL(reference || model) on the retain side"})
    beta: float = field(default=0.1, metadata={"help": "NPO temperature"})
    check_every: int = field(default=10, metadata={"help": "score the pairs every N steps and swap the sets when "
                                                          "the bias has reversed (0: never)"})
    check_pairs: int | None = field(default=32, metadata={"help": "pairs (seeded sample) scored by the reversal "
                                                                  "check and the before/after gap (None: all)"})
    limit: int = field(default=0, metadata={"help": "use the first N pairs only (0: all)"})

    def validate(self) -> None:
        if min(self.batch_size, self.lora_r) < 1 or self.epochs < 0 or not self.lr > 0 or self.limit < 0:
            raise FairforgetError("--batch-size, --lora-r must be >= 1, --epochs >= 0 (0: the start model), "
                                  "--lr > 0, --limit >= 0")
        if not self.beta > 0 or min(self.w_forget, self.w_retain, self.w_kl) < 0 or self.check_every < 0:
            raise FairforgetError("--beta must be > 0; the weights and --check-every >= 0")
        if not self.pairs.is_file():
            raise FairforgetError(f"--pairs {self.pairs} not found (run scripts/10_preprocess_winogender.py)")


def main(cfg: Config) -> None:
    start = time.perf_counter()
    pairs = read_pairs_tsv(cfg.pairs)[: cfg.limit or None]
    loaded = load_model(cfg.model, cfg.device)
    tokenizer = loaded.tokenizer
    adv, dis = encode_pairs(tokenizer, pairs)
    model = add_lora(loaded.model, target_modules(loaded.model), cfg.lora_r, cfg.lora_alpha, 0.0, cfg.seed)
    model.eval()
    checked = check_sample(len(pairs), cfg.check_pairs, cfg.seed)
    gap_before = pair_gap(model, [adv[i] for i in checked], [dis[i] for i in checked], tokenizer.pad_token_id)
    weights = Weights(cfg.w_forget, cfg.w_retain, cfg.w_kl, cfg.beta)
    typed = typed_config(BiasUnlearnConfig, cfg)
    log = unlearn(model, tokenizer.pad_token_id, adv, dis, weights, cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed,
                  cfg.check_every, check_pairs=cfg.check_pairs,
                  on_epoch=lambda epoch: save_epoch_setting(cfg, model, tokenizer, "bias_unlearn", typed, epoch))
    gap_after = pair_gap(model, [adv[i] for i in checked], [dis[i] for i in checked], tokenizer.pad_token_id)
    save_adapter(model, tokenizer, cfg.out, cfg.model)
    save_method_config(cfg.out, "bias_unlearn", typed)
    write_csv(cfg.log_dir / "steps.csv", log.steps)
    if log.swaps:
        write_csv(cfg.log_dir / "swaps.csv", log.swaps)
    record = write_method_record(cfg.log_dir, "bias_unlearn", cfg, time.perf_counter() - start, [cfg.pairs],
                                 model_folder=str(cfg.out), chosen_setting=setting_name("epochs", cfg.epochs),
                                 weights=asdict(weights), n_pairs=len(pairs),
                                 steps=len(log.steps), swaps=log.swaps, n_pairs_checked=len(checked),
                                 pair_gap_before=gap_before,
                                 pair_gap_after=gap_after)
    print(f"BiasUnlearn: {len(log.steps)} steps, {len(log.swaps)} swaps; stereotype side preferred in "
          f"{100 * gap_before['share_adv_preferred']:.1f}% -> {100 * gap_after['share_adv_preferred']:.1f}% of pairs "
          f"({record['wall_seconds']:.0f} s, peak {record['peak_memory_mib']:.0f} MiB) -> {cfg.out}")


if __name__ == "__main__":
    run_script(main, Config())
