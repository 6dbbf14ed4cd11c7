"""The wider Hugging Face zoo: tiny configs of ~45 more architectures, random weights.

Each builder returns a transformers model from a small config (hidden <= 64, 2 layers) so a
capture takes about a second. The families cover what the compiler must handle: encoders
(absolute, relative and disentangled position schemes, factorised embeddings), decoders with
grouped/multi-query attention, mixture-of-experts, sliding windows and parallel blocks,
encoder-decoders, ViT-style and hierarchical vision transformers, CNNs (bottleneck,
depthwise-separable with squeeze-excitation, grouped), audio encoders and a selective
state-space model. `rewrite.zoo` registers them; use `zoo.load(name)`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .inputs import Inputs

V = 128  # vocabulary of every text model


_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
"""Special token ids inside the tiny vocabulary (the defaults, e.g. 50256, are out of range)."""


def _cfg(cls_name: str, text: bool = True, **kw: Any) -> Any:
    import transformers

    return getattr(transformers, cls_name)(**({**_IDS, **kw} if text else kw))


def _model(cls_name: str, cfg: Any, **kw: Any) -> nn.Module:
    import transformers

    return getattr(transformers, cls_name)(cfg, **kw)


_ENC = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64)
_DEC = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, use_cache=False)


def _enc(model: str, config: str, **over: Any) -> Callable[[], nn.Module]:
    return lambda: _model(model, _cfg(config, **{**_ENC, **over}))


def _dec(model: str, config: str, drop: tuple[str, ...] = (), **over: Any) -> Callable[[], nn.Module]:
    base = {k: v for k, v in _DEC.items() if k not in drop}
    return lambda: _model(model, _cfg(config, **{**base, **over}))


# name -> (builder, input kind, extra input options)
TEXT_ENCODERS: dict[str, Callable[[], nn.Module]] = {
    "roberta": _enc("RobertaModel", "RobertaConfig", max_position_embeddings=80, pad_token_id=1, bos_token_id=0),
    "xlm_roberta": _enc("XLMRobertaModel", "XLMRobertaConfig", max_position_embeddings=80, pad_token_id=1, bos_token_id=0),
    "distilbert": lambda: _model("DistilBertModel", _cfg("DistilBertConfig", vocab_size=V, dim=64, n_layers=2, n_heads=4,
                                                          hidden_dim=128, max_position_embeddings=64)),
    "albert": _enc("AlbertModel", "AlbertConfig", embedding_size=32),
    "electra": _enc("ElectraModel", "ElectraConfig", embedding_size=32),
    "deberta": _enc("DebertaModel", "DebertaConfig", relative_attention=True, max_relative_positions=32,
                    pos_att_type=["c2p", "p2c"]),
    "deberta_v2": _enc("DebertaV2Model", "DebertaV2Config", relative_attention=True, position_buckets=16,
                       max_relative_positions=32, pos_att_type=["c2p", "p2c"], norm_rel_ebd="layer_norm",
                       share_att_key=True),
    "mpnet": _enc("MPNetModel", "MPNetConfig", max_position_embeddings=80),
    "mobilebert": _enc("MobileBertModel", "MobileBertConfig", embedding_size=32, intra_bottleneck_size=32,
                       true_hidden_size=32, num_feedforward_networks=2),
    "modernbert": lambda: _model("ModernBertModel", _cfg("ModernBertConfig", vocab_size=V, hidden_size=64,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=96, max_position_embeddings=64,
                                                          global_attn_every_n_layers=2, local_attention=8,
                                                          cls_token_id=1, sep_token_id=2)),
}

DECODERS: dict[str, Callable[[], nn.Module]] = {
    "mistral": _dec("MistralModel", "MistralConfig", sliding_window=None),
    "qwen2": _dec("Qwen2Model", "Qwen2Config"),
    "qwen3": _dec("Qwen3Model", "Qwen3Config", head_dim=16),
    "qwen2_moe": _dec("Qwen2MoeModel", "Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "mixtral": _dec("MixtralModel", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "gemma": _dec("GemmaModel", "GemmaConfig", head_dim=16),
    "gemma2": _dec("Gemma2Model", "Gemma2Config", head_dim=16, sliding_window=8),
    "gemma3": _dec("Gemma3TextModel", "Gemma3TextConfig", head_dim=16, sliding_window=8),
    "phi3": _dec("Phi3Model", "Phi3Config"),
    "phi": _dec("PhiModel", "PhiConfig"),
    "olmo": _dec("OlmoModel", "OlmoConfig"),
    "stablelm": _dec("StableLmModel", "StableLmConfig"),
    "granite": _dec("GraniteModel", "GraniteConfig"),
    "starcoder2": _dec("Starcoder2Model", "Starcoder2Config", sliding_window=None),
    "gpt_neox": lambda: _model("GPTNeoXModel", _cfg("GPTNeoXConfig", vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=128,
                                                     max_position_embeddings=64, use_cache=False)),
    "gptj": lambda: _model("GPTJModel", _cfg("GPTJConfig", vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                              n_positions=64, use_cache=False)),
    "opt": lambda: _model("OPTModel", _cfg("OPTConfig", vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, ffn_dim=128, max_position_embeddings=64,
                                            word_embed_proj_dim=64, use_cache=False)),
    "falcon": lambda: _model("FalconModel", _cfg("FalconConfig", vocab_size=V, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, multi_query=True, new_decoder_architecture=False,
                                                  parallel_attn=True, use_cache=False)),
    "bloom": lambda: _model("BloomModel", _cfg("BloomConfig", vocab_size=V, hidden_size=64, n_layer=2, n_head=4,
                                                use_cache=False)),
    "gpt_bigcode": lambda: _model("GPTBigCodeModel", _cfg("GPTBigCodeConfig", vocab_size=V, n_embd=64, n_layer=2, n_head=4,
                                                           n_positions=64, multi_query=True, use_cache=False)),
}

SEQ2SEQ: dict[str, Callable[[], nn.Module]] = {
    "t5": lambda: _model("T5Model", _cfg("T5Config", vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                          num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                          use_cache=False, decoder_start_token_id=1)),
    "bart": lambda: _model("BartModel", _cfg("BartConfig", vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2,
                                              encoder_attention_heads=4, decoder_attention_heads=4,
                                              encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                                              use_cache=False)),
    "pegasus": lambda: _model("PegasusModel", _cfg("PegasusConfig", vocab_size=V, d_model=64, encoder_layers=2,
                                                    decoder_layers=2, encoder_attention_heads=4,
                                                    decoder_attention_heads=4, encoder_ffn_dim=128,
                                                    decoder_ffn_dim=128, max_position_embeddings=64, use_cache=False)),
}

_VIT = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128)

VISION: dict[str, Callable[[], nn.Module]] = {
    # ViT family
    "deit": lambda: _model("DeiTModel", _cfg("DeiTConfig", False, **_VIT), add_pooling_layer=False),
    "beit": lambda: _model("BeitModel", _cfg("BeitConfig", False, **_VIT, use_relative_position_bias=True,
                                              use_mean_pooling=True)),
    "dinov2": lambda: _model("Dinov2Model", _cfg("Dinov2Config", False, **_VIT)),
    # hierarchical
    "swin": lambda: _model("SwinModel", _cfg("SwinConfig", False, image_size=32, patch_size=2, embed_dim=16, depths=[2, 2],
                                              num_heads=[2, 4], window_size=4, mlp_ratio=2.0)),
    "segformer": lambda: _model("SegformerModel", _cfg("SegformerConfig", False, num_encoder_blocks=2, depths=[1, 1],
                                                        sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
                                                        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])),
    "mobilevit": lambda: _model("MobileViTModel", _cfg("MobileViTConfig", False, image_size=32, patch_size=2,
                                                        hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 48],
                                                        num_attention_heads=2, mlp_ratio=2.0), expand_output=False),
    "poolformer": lambda: _model("PoolFormerModel", _cfg("PoolFormerConfig", False, num_encoder_blocks=2, depths=[1, 1],
                                                          hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                                                          padding=[2, 1], pool_size=3)),
    # CNNs
    "efficientnet": lambda: _model("EfficientNetModel", _cfg("EfficientNetConfig", False, image_size=32, width_coefficient=0.25,
                                                              depth_coefficient=0.3, hidden_dim=320,
                                                              kernel_sizes=[3, 3, 5], in_channels=[32, 16, 24],
                                                              out_channels=[16, 24, 40], depthwise_padding=[],
                                                              strides=[1, 2, 2], num_block_repeats=[1, 2, 2],
                                                              expand_ratios=[1, 6, 6])),
    "regnet": lambda: _model("RegNetModel", _cfg("RegNetConfig", False, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2],
                                                  groups_width=8, layer_type="y")),
    "mobilenetv1": lambda: _model("MobileNetV1Model", _cfg("MobileNetV1Config", False, image_size=32, depth_multiplier=0.25)),
    "convnextv2": lambda: _model("ConvNextV2Model", _cfg("ConvNextV2Config", False, num_stages=2, hidden_sizes=[16, 32],
                                                          depths=[1, 2], image_size=32)),
}

AUDIO: dict[str, Callable[[], nn.Module]] = {
    "wav2vec2": lambda: _model("Wav2Vec2Model", _cfg("Wav2Vec2Config", False, hidden_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, intermediate_size=128,
                                                      conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                                      do_stable_layer_norm=True, feat_extract_norm="layer")),
    "whisper_encoder": lambda: _model("WhisperModel", _cfg("WhisperConfig", vocab_size=V, d_model=64, encoder_layers=2,
                                                            decoder_layers=1, encoder_attention_heads=4,
                                                            decoder_attention_heads=4, encoder_ffn_dim=128,
                                                            decoder_ffn_dim=128, num_mel_bins=16,
                                                            max_source_positions=16, max_target_positions=32, decoder_start_token_id=1,
                                                            use_cache=False)).get_encoder(),
}

SSM: dict[str, Callable[[], nn.Module]] = {
    "mamba": lambda: _model("MambaModel", _cfg("MambaConfig", vocab_size=V, hidden_size=32, state_size=8,
                                                num_hidden_layers=2, expand=2, conv_kernel=4, use_cache=False)),
}


# -- inputs --------------------------------------------------------------------------
def text(seed: int, batch: int = 2, seq: int = 12, vocab: int = V, pad: bool = True, mask: bool = True,
         low: int = 3) -> Inputs:
    """Token ids from `low` (3: below are pad/bos/eos in most configs) with the last row right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (batch, seq), generator=g)
    kwargs: dict[str, Any] = {"input_ids": ids}
    if mask:
        m = torch.ones(batch, seq, dtype=torch.long)
        if pad and batch > 1:
            m[-1, seq - seq // 3:] = 0
        kwargs["attention_mask"] = m
    return Inputs((), kwargs)


def seq2seq(seed: int) -> Inputs:
    enc = text(seed)
    dec = text(seed + 1000, seq=8, mask=False)
    return Inputs((), {**enc.kwargs, "decoder_input_ids": dec.kwargs["input_ids"]})


def image(seed: int, size: int = 32) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    return Inputs((torch.randn(2, 3, size, size, generator=g),), {})


def waveform(seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    return Inputs((torch.randn(2, 400, generator=g),), {})


def mel(seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    return Inputs((torch.randn(2, 16, 32, generator=g),), {})


def entries() -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], Inputs], str]]:
    """name -> (builder, batch(seed), kind) for every architecture in this module."""
    out: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Inputs], str]] = {}
    out.update({n: (b, text, "text") for n, b in TEXT_ENCODERS.items()})
    out.update({n: (b, text, "text") for n, b in DECODERS.items()})
    out.update({n: (b, seq2seq, "text") for n, b in SEQ2SEQ.items()})
    out.update({n: (b, image, "vision") for n, b in VISION.items()})
    out["wav2vec2"] = (AUDIO["wav2vec2"], waveform, "audio")
    out["whisper_encoder"] = (AUDIO["whisper_encoder"], mel, "audio")
    out.update({n: (b, lambda s: text(s, mask=False), "text") for n, b in SSM.items()})
    return out
