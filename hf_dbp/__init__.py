"""hf-dbp: decorrelated backpropagation (DBP) for any PyTorch model, in the Hugging Face stack and any training loop.

Any model: `hf_dbp.decorrelate(model, hf_dbp.DecorrelationConfig(...))` (a transformers model, timm's, a plain
module); any loop: `hf_dbp.attach_decorrelation(optimizer, model)` (the decorrelation step after every optimizer
step), `hf_dbp.DecorrelationCallback` for any `transformers.Trainer`, or `hf_dbp.DBPTrainer`; then
`hf_dbp.load_decorrelated` to load it back and `hf_dbp.merge_decorrelation` to fold R into a plain model.

Importing the package registers the model type `vit_mae_dbp` with `AutoConfig`, `AutoModel` and
`AutoModelForPreTraining`, and teaches transformers to load older (4.x) ViTMAE checkpoints into the DBP classes.
"""

from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForPreTraining, ViTMAEConfig
from transformers.models.auto import modeling_auto

from .core.config import DecorrelationConfig
from .core.decorrelation import Decorrelation
from .core.engines import FSDP_IGNORED_MODULES, fsdp_ignored_params, prepare_for_deepspeed
from .core.inject import DecorrelationMonitor, fold_decorrelation, inject_decorrelation
from .core.layers import DecorrelatedConv1D, DecorrelatedConv2d, DecorrelatedLinear
from .core.model import (
    begin_decorrelation_step,
    decorrelate,
    decorrelation_config_of,
    decorrelation_step,
    defer_weight_gradients,
    load_decorrelated,
    merge_decorrelation,
)
from .core.optimizer_hook import DecorrelationHook, attach_decorrelation
from .core.plan import plan_decorrelation
from .models.vit_mae_dbp.configuration_vit_mae_dbp import DECORRELATION_LAYER_KINDS, ViTMAEDBPConfig
from .models.vit_mae_dbp.modeling_vit_mae_dbp import (
    ViTMAEDBPForPreTraining,
    ViTMAEDBPModel,
    ViTMAEDBPPreTrainedModel,
    vit_mae_decorrelation_groups,
)
from .models.vit_mae_dbp.modeling_vit_mae_dbp_backbone import (
    ViTMAEBackboneFromPreTraining,
    ViTMAEDBPBackbone,
    ViTMAEDBPBackboneConfig,
    ViTMAEDBPBackboneFromPreTraining,
    layer_decay_parameter_groups,
    upernet_around_encoder,
    upernet_from_pretraining_checkpoint,
)
from .target_modules import TARGET_MODULES
from .tasks.segmentation.image_processing import DBPSegmentationImageProcessor
from .training.callbacks import DecorrelationCallback, EmissionsCallback, TrainingClockCallback
from .training.trainer import DBPTrainer
from .training.training_args import DBPTrainingArguments

__version__ = "0.1.0"

AutoConfig.register(ViTMAEDBPConfig.model_type, ViTMAEDBPConfig, exist_ok=True)
AutoModel.register(ViTMAEDBPConfig, ViTMAEDBPModel, exist_ok=True)
AutoModelForPreTraining.register(ViTMAEDBPConfig, ViTMAEDBPForPreTraining, exist_ok=True)
# Saved DBP checkpoints also carry their code (configuration, modeling and decorrelation modules, and an auto_map), so
# that `AutoModelForPreTraining.from_pretrained(repo, trust_remote_code=True)` loads them where hf_dbp is not installed
# (hf_dbp.models.vit_mae_dbp.remote_code).
# Which class is the base model (no head, no loss) transformers reads from static name lists per model type, which
# the registrations above do not extend: its model-testing mixins (training tests skip base models) and its pipelines'
# model-type checks consult them. transformers has no API to add to them; they are plain dicts, and the lazy Auto
# mappings built on them read only model types of its own (CONFIG_MAPPING_NAMES), so an entry here changes nothing
# else. ViTMAE's own entries, for ours:
for _names, _class in (
    (modeling_auto.MODEL_MAPPING_NAMES, ViTMAEDBPModel),
    (modeling_auto.MODEL_FOR_PRETRAINING_MAPPING_NAMES, ViTMAEDBPForPreTraining),
    (modeling_auto.MODEL_FOR_IMAGE_MAPPING_NAMES, ViTMAEDBPModel),
):
    _names.setdefault(ViTMAEDBPConfig.model_type, _class.__name__)
AutoConfig.register(ViTMAEDBPBackboneConfig.model_type, ViTMAEDBPBackboneConfig, exist_ok=True)
# The backbone serves its own config, and DBP-MAE and plain MAE pre-training checkpoints (encoder only, no masking).
AutoBackbone.register(ViTMAEDBPBackboneConfig, ViTMAEDBPBackbone, exist_ok=True)
AutoBackbone.register(ViTMAEDBPConfig, ViTMAEDBPBackboneFromPreTraining, exist_ok=True)
AutoBackbone.register(ViTMAEConfig, ViTMAEBackboneFromPreTraining, exist_ok=True)
# The image processor of UperNet checkpoints fine-tuned on this backbone (their preprocessor_config.json names it).
# AutoImageProcessor finds a registered class by that name; the config class it is filed under is only the key.
AutoImageProcessor.register(
    ViTMAEDBPBackboneConfig, image_processor_classes={"pil": DBPSegmentationImageProcessor}, exist_ok=True
)

__all__ = [
    "DBPSegmentationImageProcessor",
    "DBPTrainer",
    "DBPTrainingArguments",
    "DecorrelationCallback",
    "DecorrelationHook",
    "EmissionsCallback",
    "TrainingClockCallback",
    "attach_decorrelation",
    "DECORRELATION_LAYER_KINDS",
    "DecorrelatedConv1D",
    "DecorrelatedConv2d",
    "DecorrelatedLinear",
    "Decorrelation",
    "DecorrelationConfig",
    "FSDP_IGNORED_MODULES",
    "DecorrelationMonitor",
    "TARGET_MODULES",
    "ViTMAEDBPBackbone",
    "ViTMAEDBPBackboneConfig",
    "ViTMAEDBPConfig",
    "ViTMAEDBPForPreTraining",
    "ViTMAEDBPModel",
    "ViTMAEDBPPreTrainedModel",
    "begin_decorrelation_step",
    "decorrelate",
    "decorrelation_config_of",
    "decorrelation_step",
    "defer_weight_gradients",
    "fold_decorrelation",
    "fsdp_ignored_params",
    "inject_decorrelation",
    "load_decorrelated",
    "merge_decorrelation",
    "plan_decorrelation",
    "prepare_for_deepspeed",
    "layer_decay_parameter_groups",
    "upernet_around_encoder",
    "upernet_from_pretraining_checkpoint",
    "vit_mae_decorrelation_groups",
]
