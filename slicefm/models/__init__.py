"""slicefm.models"""

from slicefm.models import vit_conv_stem as _register  # noqa: F401  (makes slicefm encoders buildable by timm name)
