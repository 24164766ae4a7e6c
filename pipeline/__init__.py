import matplotlib

# Figures label points, bars and curves with task values, which are text: "$5" or "$^$" is no formula.
matplotlib.rcParams["text.parse_math"] = False
