"""Captions of the gallery figures: what each shows and the paper claim it illustrates; gallery.write_gallery_index
writes them under each study's figures; a test checks every figure in gallery/ has one. Keys are a figure's path
relative to ``gallery/`` without its extension, with a per-model folder or suffix written ``{model}``; values are
``(caption, claim)``.
"""

from __future__ import annotations

CAPTIONS: dict[str, tuple[str, str]] = {
    # ------------------------------------------------------------------ residual norms (worked example)
    "residual_norm_heatmap": (
        "Residual-stream norm entering each layer (y) at each token position (x) of the first sample of the demo run, "
        "log10 colour scale.",
        "Guo et al. 2024, Active-Dormant Attention Heads: the sink token carries a residual-state peak, a residual "
        "norm far larger than any other token's.",
    ),
    "residual_norm_profile": (
        "Residual norm by layer (log scale) of the first token (blue) and of the median token (orange), first sample "
        "of the demo run.",
        "Guo et al. 2024, Active-Dormant Attention Heads: the first token's residual norm jumps far above the typical "
        "token's a few layers in and stays there (residual-state peak).",
    ),
    "residual_norm_by_position": (
        "Bars of each token's residual norm (log scale) at the middle layer, first sample of the demo run, by "
        "position.",
        "Guo et al. 2024, Active-Dormant Attention Heads: one token, the first, stands out from all others by orders "
        "of magnitude (residual-state peak).",
    ),
    # ------------------------------------------------------------------ extreme-token phenomena
    "extreme_tokens/{model}/sink_scores_by_domain": (
        "One layer x head heatmap per input domain (prose, code, math, repeated): the mean attention that later "
        "queries pay to the first token (sink score, 0 to 1).",
        "Guo et al. 2024, Active-Dormant Attention Heads: many heads park their attention on the sink token, and how "
        "much depends on the input domain.",
    ),
    "extreme_tokens/{model}/residual_norms": (
        "Residual norm entering each layer (y) at each position (x) of the first domain sample, log10 colour; the "
        "first token's column is the residual-state peak.",
        "Guo et al. 2024, Active-Dormant Attention Heads: sink tokens show residual-state peaks, residual norms much "
        "larger than the other tokens'.",
    ),
    "extreme_tokens/{model}/value_norm_vs_attention": (
        "One point per (head, token) at a late layer of one sample: attention the token receives (mean over later "
        "queries, log x) against its value norm ||v W_O^h|| (log y); the first token in red.",
        "Guo et al. 2024, Active-Dormant Attention Heads: value-state drains, the most-attended sink token has much "
        "smaller value states than the other tokens.",
    ),
    "extreme_tokens/{model}/massive_activation_map": (
        "Largest |activation| of each residual feature dimension (x) entering each layer (y), over all samples and "
        "positions, log10 colour.",
        "Sun et al. 2024, Massive Activations: a handful of fixed feature dimensions carry activations orders of "
        "magnitude larger than the rest.",
    ),
    "extreme_tokens/{model}/massive_activation_profile": (
        "Largest |activation| by layer (log scale) of the dimensions that are massive in every sample (one line each), "
        "against the median dimension (dotted grey).",
        "Sun et al. 2024, Massive Activations: massive activations appear abruptly at a few fixed dimensions at one "
        "layer and stay nearly constant over the following layers, far above the typical dimension.",
    ),
    "extreme_tokens/{model}/massive_intervention": (
        "Mean next-token loss (nats/token) on the prose and code samples: original model; massive activations set to "
        "zero or to their mean where they appear; the same entries of random other dimensions zeroed (control).",
        "Sun et al. 2024, Massive Activations: setting the massive activations to zero breaks the model while setting "
        "them to their mean does not; they act as fixed biases.",
    ),
    "extreme_tokens/{model}/head_states": (
        "One layer x head heatmap per input domain: change in next-token loss when the head is zero-ablated (red: loss "
        "rises); black dots mark dormant heads (high sink score, negligible ablation effect).",
        "Guo et al. 2024, Active-Dormant Attention Heads: a head is dormant on some domains (attends to the sink, "
        "removing it changes nothing) and active on others.",
    ),
    "extreme_tokens/{model}/first_token_scaling": (
        "Next-token loss (left) and mean attention entropy of the scaled layers (right) against the factor applied to "
        "every query's attention to the first token (then renormalised), one line per layer group (early, middle, "
        "late thirds).",
        "ZeroTuning (initial-token attention): scaling the attention paid to the first token sharpens or flattens "
        "attention over the rest and changes the model's performance, differently by depth.",
    ),
    "extreme_tokens/{model}/streaming": (
        "Perplexity on the tokens beyond a 64-token window of one long corpus text: full attention, a sliding window "
        "alone, and the window plus the first tokens kept as attention sinks.",
        "Xiao et al. 2023, StreamingLLM: keeping the first tokens' keys and values next to a recent window keeps "
        "perplexity close to full attention; dropping them breaks the model.",
    ),
    # ------------------------------------------------------------------ next-token law and lenses
    "next_token_law/law": (
        "One panel per model: prediction residual PR_l (log scale) of a least-squares readout of the next token's id "
        "from each layer's features, layers 1..L (points), with the fitted line of log10 PR on l (dashed; Pearson r "
        "and rho in the legend).",
        "He & Su 2024, A Law of Next-Token Prediction: log PR_l falls linearly with depth, PR_l = PR_1 * rho^(l-1), "
        "so every layer contributes equally to next-token prediction.",
    ),
    "next_token_law/{model}/contributions": (
        "Bars: each layer's share (layers 2..L) of the total drop in log10 PR from the first to the last layer; dotted "
        "line: the equal share 1/(L-1).",
        "He & Su 2024, A Law of Next-Token Prediction: under the law every layer's share equals 1/(L-1); the figure "
        "shows how far each layer departs from an equal contribution.",
    ),
    "next_token_law/{model}/future_token_probes": (
        "Layer (y) x tokens ahead k (x) heatmap of held-out accuracy of linear least-squares probes predicting the "
        "token k steps ahead from that layer's features, over the most frequent tokens; cells labelled with the "
        "accuracy.",
        "Diagnostic next to He & Su 2024: how much of the tokens after the next one is linearly readable at each "
        "layer, and at which depth.",
    ),
    "next_token_law/{model}/logit_lens_cross_entropy": (
        "Layer (y) x input token (x) heatmap of the logit lens's cross-entropy (nats) on the next token, for the first "
        "held-out lens prompt: each block's output read through the model's final norm and unembedding.",
        "nostalgebraist 2020, logit lens: the model's prediction can be read from intermediate layers and sharpens "
        "with depth, reaching the output's loss only near the top.",
    ),
    "next_token_law/{model}/tuned_lens_cross_entropy": (
        "Layer (y) x input token (x) heatmap of the tuned lens's cross-entropy (nats) on the next token, for the same "
        "held-out prompt; the tuned lens is one trained affine translator per layer minimising KL to the output.",
        "Belrose et al. 2023, Tuned Lens: a learned per-layer translator reads better next-token predictions from "
        "intermediate layers than the logit lens does.",
    ),
    "next_token_law/{model}/logit_vs_tuned_lens": (
        "Per layer, mean cross-entropy on the next token (left) and mean KL(p_final || q_l) to the model's output "
        "(right) over the held-out lens prompts (first token left out): logit lens (grey) vs tuned lens (red).",
        "Belrose et al. 2023, Tuned Lens: the tuned lens is far closer to the final distribution than the logit lens "
        "at every layer, most of all in early layers.",
    ),
    # ------------------------------------------------------------------ tokenization bias, byte level, token alignment
    "tokenization_bias/transition_heatmaps": (
        "P(next character | 3-character context) on the toy Markov chain at the last training step, one row per "
        "tokenizer (MPE, BPE): true transitions, exact estimate (cover encodings), naive prompting with the encoded "
        "context, and naive prompting on a perfect model (blank: undefined).",
        "Phan et al. 2024, Understanding and Mitigating Tokenization Bias: naive conditioning on the encoded prefix "
        "is biased even for a perfect model; the exact correction recovers the true transition probabilities.",
    ),
    "tokenization_bias/error_vs_steps": (
        "Mean (left) and max (right) absolute error of the estimated transitions against training step (log x): "
        "exact (blue), naive (red), naive on a perfect model (flat, light); solid MPE, dashed BPE.",
        "Phan et al. 2024, Understanding and Mitigating Tokenization Bias: more training does not remove the naive "
        "bias (it converges to the perfect-model limit), while the exact estimate's error shrinks.",
    ),
    "tokenization_bias/bias_along_text": (
        "One row per model: total-variation distance of the naive (red) and token-healed (green, dotted) next-byte "
        "distributions to the exact one at every cut of a paragraph's first bytes; x is the byte after the cut, "
        "shading marks canonical tokens, open markers cuts inside a token.",
        "Phan et al. 2024, Exact Byte-Level Probabilities: naive prompting is biased when the prompt ends inside a "
        "token, and token healing only partly repairs it.",
    ),
    "tokenization_bias/next_byte_bars": (
        "At one example cut (the prompt ends in a space; smollm2-135m), the most probable next bytes under the exact "
        "byte-level model (blue), naive prompting (red) and token healing (green).",
        "Phan et al. 2024, Exact Byte-Level Probabilities: the naive next-byte distribution after a prompt ending "
        "inside a token puts its mass on the wrong bytes; the exact one does not.",
    ),
    "tokenization_bias/covers_table": (
        "Table of the cover encodings of the same example prefix, most probable first: their tokens (earlier ones "
        "elided), probability P(t) and share of P(x); the last row counts the rest and their share.",
        "Phan et al. 2024, Exact Byte-Level Probabilities (Byte-Token Representation Lemma): P(x) is the sum of "
        "P(t) over all cover encodings t of x.",
    ),
    "tokenization_bias/bits_per_byte": (
        "Bits per byte on held-out corpus text of each model as an exact byte-level model (grey), of their "
        "equal-weight byte-level ensemble and of the ensemble with weights tuned on a validation paragraph (orange); "
        "diamonds: token-level bits per byte of the canonical tokenization.",
        "Phan et al. 2024, Exact Byte-Level Probabilities: once exact byte-level, models with different vocabularies "
        "can be ensembled byte by byte and the ensemble beats each member.",
    ),
    "tokenization_bias/ensemble_intervals": (
        "Bits per byte (left) on held-out prose, code and both of SmolLM2 and Gemma 3 as exact byte-level models and of "
        "their byte-level mixtures (equal weights, a weight tuned on a validation split, weights learned online), and "
        "each mixture's gain over the better model (right), with 95% paired bootstrap intervals over the texts.",
        "Phan et al. 2024, Exact Byte-Level Probabilities: models with different vocabularies, made exact byte-level "
        "models, can be ensembled byte by byte (up to 3.7% better in the paper); here with its uncertainty.",
    ),
    "tokenization_bias/token_alignment_{model}": (
        "Exact-match rates of greedy completions of randomly cut prose and code, plain vs aligned-1 / aligned-2 "
        "(back off 1 or 2 tokens, then constrain generation to re-spell them): next word and first 8 characters, all "
        "cuts and cuts inside a token, 95% Wilson intervals.",
        "Athiwaratkun et al. 2024, Token Alignment: prompts that end inside a token give bad completions, and backing "
        "off to complete tokens with character-constrained generation fixes them.",
    ),
    # ------------------------------------------------------------------ tokenizer diagnostics
    "tokenizers/premium_heatmap": (
        "Tokenization premium (tokens for the same UDHR articles relative to English) of each of 49 languages (rows, "
        "sorted by the first tokenizer's premium) for each tokenizer (columns), log colour scale.",
        "Petrov et al. 2023, Tokenizer Unfairness: the same text needs many times more tokens in some languages than "
        "in English.",
    ),
    "tokenizers/premium_bars": (
        "Horizontal bars of the premium per language (log x), one bar per tokenizer, sorted by the first tokenizer's "
        "premium; the dotted line marks parity with English (1x).",
        "Petrov et al. 2023, Tokenizer Unfairness: token counts for parallel text differ by large factors between "
        "languages, and by how much depends on the tokenizer.",
    ),
    "tokenizers/loss_vs_premium": (
        "One point per (model, language): the language's premium vs English (log x) against the model's loss in bits "
        "per UTF-8 byte on the first UDHR articles.",
        "Diagnostic after Petrov et al. 2023: do languages that cost more tokens also get modelled worse per byte?",
    ),
    "tokenizers/undertrained_{model}": (
        "Weight indicator of every token (cosine distance of its unembedding row to the mean of the reference unused "
        "rows; low means under-trained) against token id; verified candidates coloured by the verdict of the "
        "repeat-the-token prompts, others grey.",
        "Land & Bartolo 2024, Fishing for Magikarp: under-trained tokens can be found from the weights alone and "
        "confirmed by prompting the model to repeat them.",
    ),
    "tokenizers/sums_{model}": (
        "Mean log-probability (nats) of the correct sum of two random n-digit numbers in a few-shot prompt, by digits "
        "per operand, written plain vs with thousands separators; error bars 95% intervals.",
        "Diagnostic of number tokenization: does forcing 3-digit groups with separators help or hurt the model's "
        "arithmetic, given how its tokenizer cuts digits?",
    ),
    "tokenizers/noncanonical_{model}": (
        "Per layer (residual after the block), cosine between the last-token residual of the canonical spelling of a "
        "word after a short context and that of each non-canonical spelling (legend: tokens, log-probability vs the "
        "canonical one).",
        "Diagnostic of non-canonical tokenizations: does the model merge other spellings of a word into the same "
        "representation as depth grows?",
    ),
    # ------------------------------------------------------------------ token geometry and layer updates
    "geometry/id_profile": (
        "Median over prompts of the intrinsic dimension (GRIDE at scale 2, i.e. TwoNN) of each prompt's token cloud "
        "against relative depth, one line per model with an interquartile band.",
        "Viswanathan et al., The Geometry of Tokens: the intrinsic dimension of a prompt's token cloud rises to a peak "
        "and falls again across layers.",
    ),
    "geometry/id_vs_loss": (
        "Spearman's rho between a prompt's intrinsic dimension and its mean next-token cross-entropy at each relative "
        "depth, one line per model with a 95% bootstrap band.",
        "Viswanathan et al., The Geometry of Tokens: prompts with higher loss have higher intrinsic dimension.",
    ),
    "geometry/shuffle_{model}": (
        "Intrinsic dimension (scale 2), nearest-neighbour overlap between consecutive depths (k = 1) and mean pairwise "
        "cosine against depth, median over prompts, one line per shuffle level (original to 4^5 blocks shuffled).",
        "Viswanathan et al., The Geometry of Tokens: shuffling a prompt's tokens raises the intrinsic-dimension peak.",
    ),
    "geometry/trajectories": (
        "Last-token trajectories across layers: principal components for 90% of the variance by relative depth "
        "(left), KL(full || rank K) of the output vs K (middle), and held-out next-layer error of a linear drift model "
        "vs no-update and mean-update baselines (right).",
        "Sarfati et al., Lines of Thought: last-token trajectories lie near a low-dimensional manifold and a linear "
        "drift plus noise model describes them.",
    ),
    "geometry/update_norms": (
        "Median residual norm entering each layer (left, log) and each layer's relative contribution ||u|| / ||h + u|| "
        "(right) against relative depth, one colour per model; solid: other tokens, dotted: sink tokens.",
        "Attention Residuals: in PreNorm models the residual norm grows with depth and each layer's relative "
        "contribution shrinks (dilution).",
    ),
    "geometry/tokenwise_fit": (
        "Held-out R^2 of the layer update as a linear function of the token's own direction (full and rank-restricted "
        "fits, left), and Spearman between the leftover ||u - f(h)|| and the output KL when the fit replaces the "
        "update (right), by relative depth.",
        "On the Geometric Structure of Layer Updates: the update is dominated by a tokenwise component, and the "
        "leftover predicts how much the output changes.",
    ),
    "geometry/stages": (
        "Effect of deleting one layer (solid) or swapping it with the next (dashed) by relative depth: share of top-1 "
        "predictions kept (left), KL(original || intervened) (middle, log); logit-lens KL to final and entropy "
        "(right, log).",
        "Lad et al., Stages of Inference: models keep most of their predictions when one layer is deleted or two "
        "adjacent layers are swapped, except at the first layer.",
    ),
    "geometry/redundancy": (
        "Left: KL to prompt A's output after patching A's residual at one layer into prompt B, whole residual vs last "
        "position only, by relative depth (KL 0 drawn at 1e-12). Right: bf16 cache per token, one layer's residual vs "
        "the KV cache of all layers.",
        "The Residual Stream Is All You Need: keys and values are recomputable from the residual stream (patching the "
        "whole residual gives KL = 0) at a fraction of the KV cache's memory.",
    ),
}
