# Let the tests import the repo's top-level modules (prepare, configurator, model, ...) under plain `pytest` too.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
