"""Bundle steps: each runs builders inside one bundle transaction, verifies what they made and
returns the committed :class:`~attunet_deploy.bundle.Bundle` (export, quantize, engines, Triton repository)."""
