"""int8 matrix multiplication: the checked entry points over the compiled loops.

The kernels chapter (``book/kernels.md``) explains the multiply-accumulate (MAC) unit these
functions model: 8-bit operands, 16-bit products, a 32-bit accumulator.  The loops themselves
live in the Cython extension ``qcourse._kernels``; this module validates the inputs, allocates
the output and is the only place a learner calls.

The package's files hold its parts (every name is reached as ``qcourse.kernels.NAME``):

* ``matmul.py`` -- the int8 GEMM: the chapter's ladder of loops (:data:`LADDER`), the
  instruction-set paths, packing (:func:`prepack`), threads, :func:`matmul_int8` and the
  requantizing :func:`matmul_int8_requant`, with their NumPy references;
* ``depthwise.py`` -- :func:`depthwise_conv_int8` (the conv chapter);
* ``w4a8.py`` -- int4 weights in groups with int8 activations (:func:`prepack_int4`,
  :func:`matmul_w4a8`; the lowbit chapter).
"""

from qcourse import _kernels  # noqa: F401 (the compiled loops: qcourse.kernels._kernels)
from qcourse._deprecated import moved_names
from qcourse.kernels import depthwise, matmul, w4a8
from qcourse.kernels.depthwise import *  # noqa: F403 (the names of depthwise.__all__)
from qcourse.kernels.matmul import *  # noqa: F403 (the names of matmul.__all__)
from qcourse.kernels.matmul import (  # noqa: F401 (used by qcourse.conv and the tests)
    _NO_INT32,
    _PATH_NAMES,
    _PATHS,
    _aligned_empty,
    _default_threads,
    _path_code,
    _scratch,
)
from qcourse.kernels.w4a8 import *  # noqa: F403 (the names of w4a8.__all__)

__all__ = [*matmul.__all__, *depthwise.__all__, *w4a8.__all__]

__getattr__ = moved_names(__name__, {"matmul_int8_packed": "qcourse.kernels.matmul_int8"})
