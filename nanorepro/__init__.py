"""nanorepro: re-run nanoGPT's Shakespeare experiments and judge them against the published numbers.

Importing the package is cheap and never imports torch: the Chameleon hub kernel (1 GB RAM,
no GPU) imports the light modules only (config, metrics, plots, report, chameleon, runner).
In a Jupyter kernel it also makes a UserError show as its one line (problem and fix), as the CLI does.
"""

from nanorepro.errors import one_line_in_notebooks

__version__ = "0.1.0"

one_line_in_notebooks()
