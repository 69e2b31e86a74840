import logging
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("torch").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
