"""A model file whose dict output returns an input under its name (shared by the exporter and CLI tests)."""
import torch


class Echo(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x, y):
        return {"out": self.fc(x), "y": y}


def build_model():
    return Echo()


def example_inputs():
    return (torch.randn(2, 3), torch.randn(2, 5))
