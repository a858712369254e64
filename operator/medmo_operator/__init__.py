"""MedMO Operator: runs a MedMOTraining custom resource's stages on Kubernetes or on one machine."""
