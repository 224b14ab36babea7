"""One way to start a deployment: export, trusted module and endpoint, in this process or as processes."""

from sealnet.deployment.local import DeploymentError, LocalDeployment

__all__ = ["DeploymentError", "LocalDeployment"]
