"""evaluation/scoring.py: \\boxed{} extraction, letters, numbers in the formats models write, scoring."""
import pytest

import evaluation.scoring as SC


@pytest.mark.parametrize("text, want", [
    (r"so \boxed{B}", "B"),
    (r"\boxed{A} no, wait: \boxed{C}", "C"),  # several boxes: the last one
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{\boxed{D}}", "D"),  # a box in a box: the innermost starts last
    (r"\boxed {42}", "42"),
    (r"\boxed{7} then \boxed{8", "7"),  # an unclosed (truncated) box is no match
    ("the answer is B", None),
    ("", None),
])
def test_extract_boxed(text, want):
    assert SC.extract_boxed(text) == want


@pytest.mark.parametrize("s, want", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("(B).", "B"), ("b", "B"), (r"\text{B}", "B"), ("$B$", "B"),
    ("B. Nairobi", "B"), ("(B) Nairobi", "B"), ("B) Nairobi", "B"), (" C ", "C"),
    ("E", None), ("A dog", None), ("Nairobi", None), ("42.0", None), ("AB", None), (None, None),
])
def test_normalize_choice(s, want):
    assert SC.normalize_choice(s) == want



@pytest.mark.parametrize("s, n, want", [
    ("E", 5, "E"), ("(J).", 10, "J"), ("j", 10, "J"), ("J. Paris", 10, "J"), ("E", 4, None),
    ("K", 10, None), ("F", 5, None), ("I", 10, "I"), ("I think", 10, None),
])
def test_normalize_choice_up_to_ten_options(s, n, want):
    """MMLU-Pro / MMLU-ProX items have up to 10 options (A-J): only the item's own letters count."""
    assert SC.normalize_choice(s, n) == want


def test_score_output_reads_the_letters_of_the_item():
    ten = dict(choices=[str(i) for i in range(10)], answer="J")
    assert SC.score_output(ten, r"so \boxed{J}", "generative") == ("J", True)
    four = dict(choices=list("wxyz"), answer="D")
    assert SC.score_output(four, r"\boxed{E}", "generative") == (None, False)

@pytest.mark.parametrize("s, want", [
    ("42", 42.0), ("42.0", 42.0), ("42.", 42.0), ("1,234", 1234.0), ("-3", -3.0), ("\u22125", -5.0),
    ("$18", 18.0), (r"18\%", 18.0), (r"\frac{1}{2}", 0.5), ("3/4", 0.75), (r"\text{18 dollars}", 18.0),
    ("x = 18", 18.0), (r"2 \times 9 = 18", 18.0), ("1,000,000", 1e6),
    ("3,5", None), ("B", None), ("1 or 2", None), (None, None), ("1/0", None),
])
def test_parse_number(s, want):
    assert SC.parse_number(s) == want


def test_score_output_letters_vs_numbers():
    mc = dict(choices=["w", "x", "y", "z"], answer="B")
    num = dict(choices=None, answer="42")
    assert SC.score_output(mc, r"\boxed{B}", "generative") == ("B", True)
    assert SC.score_output(mc, r"\boxed{(B)}", "generative") == ("B", True)
    assert SC.score_output(mc, r"\boxed{42.0}", "generative") == (None, False)
    assert SC.score_output(mc, r"\boxed{B} hmm \boxed{A}", "generative") == ("A", False)
    assert SC.score_output(num, r"\boxed{42.0}", "generative") == ("42", True)
    assert SC.score_output(num, r"\boxed{42}", "generative") == ("42", True)
    assert SC.score_output(num, r"\boxed{B}", "generative") == (None, False)
    assert SC.score_output(num, "42", "generative") == (None, False)  # no box, no answer
    assert SC.score_output(dict(num, answer="1,000"), r"\boxed{1000}", "generative")[1]
    assert SC.score_output(mc, [-3.0, -1.0, -2.0, -9.0], "loglik") == ("B", True)



@pytest.mark.parametrize("s, want", [
    (r"1{,}234", 1234.0), (r"\$1{,}234.50", 1234.5), (r"12{,}345{,}678", 12345678.0),  # LaTeX {,}
    ("1 234", 1234.0), ("1\u00a0234", 1234.0), ("1\u2009234\u2009567", 1234567.0), ("1\u202f000", 1000.0),
    (r"1\,234", 1234.0), (r"1\!234", 1234.0), ("1,23,456", 123456.0),  # thin spaces; Indian grouping
    ("1.234.567", 1234567.0), ("1.234,5", 1234.5), ("1.234", 1.234),  # a lone 1.234 is a decimal by default
    (r"\$18", 18.0), (r"\$18.00", 18.0), (r"25\%", 25.0), (r"\text{18}", 18.0), (r"18\text{ dollars}", 18.0),
    (r"\textbf{42}", 42.0), ("12 km", 12.0), (r"5 m^2", 5.0), (r"7\text{ cm}^{3}", 7.0), ("3 hours.", 3.0),
    ("1 or 2", None), ("12 345 6", None), ("1,2345", None), ("3 apples and 4 pears", None),
])
def test_parse_number_formats_models_write(s, want):
    assert SC.parse_number(s) == want


def test_parse_number_dot_thousands_by_language():
    """"1.234" is one thousand two hundred thirty-four in German or Spanish, 1.234 in English; the item's
    language decides, a three-decimal number in a dot-thousands language is the price of that choice."""
    assert SC.parse_number("1.234", "de") == 1234.0 and SC.parse_number("1.234", "es") == 1234.0
    assert SC.parse_number("1.234", "en") == 1.234 and SC.parse_number("1.234", "sw") == 1.234
    assert SC.parse_number("1.5", "de") == 1.5 and SC.parse_number("12.50", "de") == 12.5  # not groups of 3
    num = dict(choices=None, answer="1234")
    assert SC.score_output(dict(num, lang="de"), r"\boxed{1.234}", "generative") == ("1234", True)
    assert SC.score_output(dict(num, lang="en"), r"\boxed{1.234}", "generative") == ("1.234", False)
    assert SC.score_output(dict(num, lang="sw"), r"so \boxed{1{,}234}", "generative") == ("1234", True)
