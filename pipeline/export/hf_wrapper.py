"""The transformers side of an exported model: appended to the generated `modeling_<stem>.py` (codegen.py),
where `CoreModel` becomes the architecture's class (HybridLM) and `Exported` its prefix. Not imported in the
pipeline itself.

Generation carries the model's own recurrent state (liquid, spiking and Mamba states, attention KV caches) as
the `state` keyword between calls, as `launch/generate.py` does, instead of transformers' `Cache` classes: the
prompt runs as one parallel forward, each new token as one step.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class ExportedCausalLMOutput(ModelOutput):
    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    state: Optional[dict] = None
    """The recurrent state after the last input token (with `use_cache=True`): pass it back as `state=` with the
    next tokens to continue the sequence."""


def _check_padding(attention_mask: Optional[torch.Tensor]) -> None:
    """Right padding only: a recurrent state would carry left padding into every later token."""
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
        return
    mask = attention_mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("this recurrent model cannot skip padding before tokens (left padding): run sequences of "
                         "different lengths one at a time (lm_eval: --batch_size 1) or pad on the right")


class ExportedPreTrainedModel(PreTrainedModel):
    config_class = ExportedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = NO_SPLIT_MODULES

    def _init_weights(self, module):
        """The core model initialises itself in its constructor; from_pretrained then loads every weight."""


class ExportedForCausalLM(ExportedPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: ExportedConfig):
        super().__init__(config)
        self.model = CoreModel(ModelConfig(**config.model_fields()))
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, state: Optional[dict] = None,
                use_cache: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs):
        """logits (B, T, V) of input_ids (B, T); `labels` (B, T) give the mean next-token loss (-100: ignored),
        as in every transformers causal LM; `state` continues a sequence, `use_cache` returns the new state."""
        _check_padding(attention_mask)
        want_state = bool(use_cache) or state is not None
        if want_state and state is None:
            state = self.model.init_state(input_ids.shape[0], input_ids.device, self.model.embed.weight.dtype,
                                          max_len=input_ids.shape[1])
        if want_state:
            logits, state = self.model(input_ids, state, return_state=True)
        else:
            logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return ExportedCausalLMOutput(loss=loss, logits=logits, state=state if want_state else None)

    # -- generate(): the recurrent state instead of transformers' caches -----------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids, state=None, attention_mask=None, **kwargs):
        if state is not None:  # the state holds everything before the newest token
            return {"input_ids": input_ids[:, -1:], "state": state, "use_cache": True}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        model_kwargs["state"] = outputs.state
        return model_kwargs
