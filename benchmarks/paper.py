"""The speed numbers the mPLUG paper states, in one place, each with where it is written.

Sources: the two versions of the mPLUG paper (Li et al.), as plain text extracted from their
PDFs (not shipped with this repository):
  EMNLP = mPLUG, EMNLP 2022 version, with the appendix (Table 10 and 11)
  ARXIV = mPLUG, arXiv 2205.12005 version (Table 6, Figures 1, 3, 4)
Line numbers ("l.") are lines of those text extractions; the table, figure and section named
beside each one find the same place in the PDF. The extraction garbled some tables, so every table
value below was checked against a second place (the row sums of a table, or the text that
restates it); `check` says how.

What the paper does NOT state for its timings: the batch size, the image resolution / number
of image tokens and the text length. Figures 1, 3 and 4 give no GPU; the appendix (EMNLP
lines 1116-1121) says Table 10 was timed on one V100-32G and that Figure 3 times the
skip-connected module alone. Table 6 gives no GPU count, model size or batch either; the
pretraining section (ARXIV line 132, EMNLP line 903) trains on 16 A100 (80 GB) with a total
batch of 1024, but the paper does not say Table 6 used that setting, and the stated
pretraining wall time implies a higher rate than Table 6's last row (PRETRAIN_HOURS below).
"""
from __future__ import annotations

EMNLP = "mPLUG (Li et al.), EMNLP 2022 version with appendix; text extraction"
ARXIV = "mPLUG (Li et al.), arXiv 2205.12005; text extraction"

# Timing protocol of Figures 1, 3, 4 and Table 10: total forward time of 100 samples.
TIMING = ("total forward time of 100 samples (ARXIV l.22, l.264, l.277; EMNLP l.1101, "
          "l.1119-1121); batch size, image resolution and text length not stated")

# ---- fusion-network speed ratios (Figures 1, 3, 4) -----------------------------------------
RATIOS = {
    # ARXIV l.266 "reduced ... by 5X times from S = 1 to S = 6"; EMNLP l.553-555 the same.
    # Check: Table 10's skip-connected column, 1.65 s / 0.28 s = 5.9 (EMNLP l.1096-1097).
    "fusion_S1_over_S6": {
        "value": 5.0, "text": "about 5x (Figure 3)",
        "where": "ARXIV l.266; EMNLP l.553-555; Table 10 gives 1.65/0.28 = 5.9",
        "condition": "mPLUG ViT-B, fusion module only, stride S = 1 vs 6; GPU not stated "
                     "(appendix: V100-32G for Table 10)"},
    # ARXIV l.266 "Compared with S=3, ... at S = 6, while speeding up by nearly 30%";
    # EMNLP l.557-560 the same. Read as: fusion time at S=3 about 1.3x the time at S=6.
    "fusion_S3_over_S6": {
        "value": 1.3, "text": "S=6 'nearly 30%' faster than S=3 (Figure 3)",
        "where": "ARXIV l.266; EMNLP l.557-560",
        "condition": "as above; '30% faster' is read as time(S=3)/time(S=6) = 1.3"},
    # ARXIV l.38 "at least four times speeding-up than other cross-modal fusion networks"
    # (Figure 1); ARXIV l.288 / EMNLP l.588-593 "skip-connected network is 4X faster" than
    # co-attention and connected-attention (Figure 4).
    "connected_over_skip": {
        "value": 4.0, "text": "at least 4x (Figures 1 and 4)",
        "where": "ARXIV l.38, l.288; EMNLP l.149-152, l.588-593",
        "condition": "same image/text encoders and number of fusion layers; stride of the "
                     "skip-connected net not stated (official base config: S=3)"},
    "coattn_over_skip": {
        "value": 4.0, "text": "at least 4x (Figures 1 and 4)",
        "where": "ARXIV l.38, l.288; EMNLP l.149-152, l.588-593",
        "condition": "as above"},
    # ARXIV l.288 / EMNLP l.600-601: BLIP-style asymmetric co-attention runs "slightly
    # faster" than the skip-connected network (no number).
    "asym_over_skip": {
        "value": None, "text": "slightly below 1 ('slightly faster', no number)",
        "where": "ARXIV l.288; EMNLP l.599-601",
        "condition": "as above"},
}

# ---- EMNLP appendix Table 10: per-module forward seconds for 100 samples ----------------
# EMNLP l.1095-1101 (table), l.1116-1121 (protocol: whole model, 1 x V100-32G, total forward
# time of 100 samples). mPLUG_ViT-S has 4 transformer layers, otherwise as ViT-B (l.1101-1102).
# Check: each row's modules add up to its total (2.95+0.14+1.65+0.32 = 5.06, ... = 3.69,
# ... = 3.08, ... = 1.71), so no digit was lost in the extraction.
TABLE10_CONDITION = "1 x V100-32G, 100 samples, total forward time (EMNLP l.1116-1121)"
TABLE10_S = {
    "ViT-B S=1": {"visual": 2.95, "text": 0.14, "fusion": 1.65, "decoder": 0.32, "total": 5.06},
    "ViT-B S=6": {"visual": 2.95, "text": 0.14, "fusion": 0.28, "decoder": 0.32, "total": 3.69},
    "ViT-S S=1": {"visual": 0.97, "text": 0.14, "fusion": 1.65, "decoder": 0.32, "total": 3.08},
    "ViT-S S=6": {"visual": 0.97, "text": 0.14, "fusion": 0.28, "decoder": 0.32, "total": 1.71},
}

# ---- ARXIV Table 6: pretraining throughput, samples/s, cumulative rows -------------------
# ARXIV l.279-286 (table); l.321 restates the ends: "from 124 samples per second to 422".
# The extraction prints the third row as "t 238.2": the stray "t" is an artefact; 238.2 is
# not restated anywhere, so it is the one value here without a second source.
# Conditions: not given in or next to the table; pretraining runs on 16 A100 with a total
# batch of 1024 (ARXIV l.132; "16*A100-80G", EMNLP l.903). Model size not stated.
# TABLE6_GPUS is that pretraining GPU count, used only to print a per-GPU figure.
TABLE6_CONDITION = ("not stated with the table (GPUs, model size, batch); the pretraining "
                    "setup is 16 x A100-80G, global batch 1024 (ARXIV l.132, EMNLP l.903)")
TABLE6_SAMPLES_PER_S = {
    "baseline": 124.0,
    "+ BFloat16": 182.7,
    "+ Gradient Checkpoint": 238.2,
    "+ ZeRO": 422.5,
}
TABLE6_GPUS = 16


def table10_ratio(module: str, vit: str = "ViT-B") -> float:
    """Table 10 time at S=1 over S=6 for one module (e.g. 'fusion' -> 1.65 / 0.28)."""
    return TABLE10_S[f"{vit} S=1"][module] / TABLE10_S[f"{vit} S=6"][module]


# ---- pretraining wall time (a second view of throughput) ---------------------------------
# EMNLP l.903-905: mPLUG_ViT-B and mPLUG_ViT-L "pretrained with 16*A100-80G GPUs on the 14M
# pre-training dataset for 107 hours and 145 hours"; ARXIV l.132: 30 epochs, batch 1024.
# 14M x 30 samples in 107 h is about 1090 samples/s for base (805 for large), well above
# Table 6's 422.5, so Table 6 was measured in some other setting that the paper does not give.
PRETRAIN_HOURS = {"base": 107.0, "large": 145.0}
PRETRAIN_SAMPLES = 14e6 * 30  # 14M image-text pairs x 30 epochs (ARXIV l.130, l.132)


def implied_pretrain_samples_per_s(variant: str) -> float:
    """Samples/s over the whole pretraining run implied by the stated wall time."""
    return PRETRAIN_SAMPLES / (PRETRAIN_HOURS[variant] * 3600)
