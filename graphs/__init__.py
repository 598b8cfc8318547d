"""hant.graphs: capture, op views, shapes, networkx view, regions, export, drawing."""

from hant.graphs.ops import (
    ActivationView, AttentionView, BatchNormView, BinaryView, ConvView, LinearView, MatmulView, NormView, PoolView,
    activation_of, add_of, attention_of, batchnorm_of, constant_of, conv_of, is_identity_like, is_shape_op,
    layernorm_of, linear_of, matmul_of, module_of, mul_of, op_kind, output_dtype, output_shape, pool_of, tensor_meta,
)
from hant.graphs.trace import as_input_tuple, propagate_shapes, trace
from hant.graphs.networkx_view import module_path, readable_target, to_networkx
from hant.graphs.regions import Region, natural_regions, region_between, sese_regions
from hant.graphs.draw import draw, share_colour, to_dot

__all__ = [name for name in dir() if not name.startswith("_")]
