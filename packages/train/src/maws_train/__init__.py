"""maws_train: MAE pre-pretraining and weakly supervised pretraining (WSP) of timm ViTs.

Public surface for other packages: `maws_train.models` (VARIANTS, build_encoder) and
`maws_train.checkpoint` (export_encoder, load_encoder). The loops are `maws_train.mae.run`
and `maws_train.wsp.run`, driven by the `maws-train` CLI.
"""
