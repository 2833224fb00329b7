"""Clean a user's own model: the pruning and fine-pruning defenses on their clean data.

``clean_model`` loads the (untrusted) model safely, converts its convolutions to masked
layers, ranks the chosen layer's channels by mean activation on the user's clean data, runs the
pruning defense (full per-channel curve) and fine-pruning, and writes the cleaned models, a
SavedModel for serving and a report.  The user's model and data files are only read.

The output folder is the user's too.  It must be outside every input (not equal to, inside or
containing the model, the clean data or the backdoor data); when it is not empty it must be a
previous run (it holds ``fineprune_manifest.json``), and ``overwrite`` then deletes exactly the
files that manifest lists -- never anything else.  Every file is entered in the manifest just
before it is written.
"""

from fineprune_tf.cleaning.errors import CleaningError, one_line_error
from fineprune_tf.cleaning.inputs import choose_output
from fineprune_tf.cleaning.output_folder import MANIFEST, OUTPUT_FILES, defended_file
from fineprune_tf.cleaning.run import DEFENSE_CHOICES, clean_model

# The package's parts: ``inputs`` (load, check, choose the layer, split the clean data),
# ``output_folder`` (the folder and manifest rules), ``run`` (``clean_model``), ``report``
# (report.md and the activation facts), ``errors``, ``multi_io`` (models with several inputs or
# outputs: the output read, the packed view).
__all__ = [
    "CleaningError",
    "DEFENSE_CHOICES",
    "MANIFEST",
    "OUTPUT_FILES",
    "choose_output",
    "clean_model",
    "defended_file",
    "one_line_error",
]
