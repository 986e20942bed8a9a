"""recaption -> precompute -> the training loader: the new variants are embedded without naming them, and training
draws them at the configured ratios, falling back (counted) where a caption was dropped."""

from __future__ import annotations

import json
from collections import Counter

from tessera.config import from_dict
from tessera.data_pipeline.precompute import run_precompute
from tessera.data_pipeline.precompute_config import PrecomputeConfig
from tessera.recaption.run import run_recaption
from tessera.trainer.data import LoaderConfig, build_loader
from tessera.trainer.data.samples import choose_variant
from tests.recaption.conftest import make_cfg, qwen_captioner
from tests.recaption.test_recaption import records

MINILM = {"name": "hf_encoder", "hf_encoder": {"path": "minilm", "max_length": 32}}


def test_recaption_precompute_train_picks_variants_at_the_ratios(emoji_ds, tiny_qwen, tmp_path):
    rc, pc = tmp_path / "rc", tmp_path / "pc"
    # The random model's captions run to max_new_tokens: keep those. Drop attribute captions over 20 MiniLM tokens,
    # so that some samples lack a variant and the loader falls back.
    run_recaption(make_cfg(emoji_ds, rc, [qwen_captioner(tiny_qwen), {"name": "attributes", "variant": "attributes"}],
                           filters={"reject": ["refusal", "too_long"], "max_tokens": 20}))
    caps = {k: r["captions"] for k, r in records(rc).items()}
    dropped = sum("attributes" not in c for c in caps.values())
    assert 0 < dropped < len(caps) and all("vlm_short" in c for c in caps.values())
    m = run_precompute(from_dict(PrecomputeConfig, {"source": str(rc), "output": str(pc), "executor": "local",
                                                    "batch_size": 32, "text_encoder": MINILM}, "test"))
    tid = m["precompute"]["text_encoder"]
    assert m["config"]["variants"] == []  # the default: every variant present
    n = len(caps)
    assert m["precompute"]["emb"] == {f"{tid}.alt": n, f"{tid}.attributes": n - dropped, f"{tid}.name": n,
                                      f"{tid}.vlm_short": n}
    # attributes is declared by the recaption manifest, so a sample without it is counted, not silently skipped.
    assert m["precompute"]["missing_caption"] == {"attributes": dropped}
    assert m["caption_variants"] == ["alt", "attributes", "vlm_short"]

    ratios = {"alt": 0.2, "vlm_short": 0.4, "attributes": 0.4}
    cfg = LoaderConfig(path=str(pc), batch_size=4, num_workers=0, epochs=6, shuffle_buffer=1, partial_buckets="drop",
                       caption_variants=ratios, text_encoder_id=tid)
    loader = build_loader(cfg, 0, 1)
    used, drawn, fallbacks = Counter(), Counter(), 0
    for batch in loader:
        for key, variant, caption in zip(batch["key"], batch["variant"], batch["caption"]):
            chosen = choose_variant(loader.spec, batch["epoch"], key)
            drawn[chosen] += 1
            expect = next(v for v in [chosen, *loader.spec.fallback] if v in caps[key])  # by decreasing ratio
            assert variant == expect and caption == caps[key][variant] and caption.strip()
            used[variant] += 1
            fallbacks += variant != chosen
    stats = loader.stats()
    assert stats["variants"] == dict(used) and stats["variant_fallbacks"] == fallbacks
    assert stats["skipped_total"] == 0 and sum(used.values()) > 150
    assert fallbacks > 0
    for v, r in ratios.items():  # drawn by a seeded hash of (seed, epoch, key): deterministic
        assert abs(drawn[v] / sum(drawn.values()) - r) < 0.1, drawn
    assert json.loads((pc / "manifest.json").read_text())["lineage"]["source"] == str(rc)
