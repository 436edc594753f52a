"""The interface of an alignment method's training component (docs/method.md, "Alignment methods"),
with the behaviour of a method that does not need a part. A method subclasses Component and writes
only the parts it changes; the loop (loop.py) calls every part, in this order:

    prepare(...)                 once, before fine-tuning (a classmethod of each method; its arguments differ)
    per optimizer step:
        begin_step(micro_batches, run)
        per micro-batch:  extend_batch(micro) -> rows;  set_rows(langs);  forward;  loss(out, batch, net, run)
        end_step(run)            after the last micro-batch's backward, before the optimizer step
    per evaluation:   set_rows(langs) before each forward;  evaluate(net, examples, pooled, run);  describe(res)
    per checkpoint:   state_dict() -> JSON-able, saved in the checkpoint's meta; load_state_dict(state) on resume
    at the export:    export_files(out_dir) -> files the model needs at inference, copied next to the weights

ce_weight is the weight of L_CE in eq. 12 (1 for every method but ShifCon, whose authors use 0.5).
"""


class Component:
    ce_weight = 1.0

    def begin_step(self, micro_batches, run):
        """Step-level bookkeeping before the step's forwards (SARA: the step's count of anchored rows)."""

    def extend_batch(self, micro):
        """Rows appended to the micro-batch for the SAME forward ({input_ids, labels all -100}); none here."""
        return []

    def set_rows(self, langs):
        """The language of each row of the next forward (ShifCon shifts by it); ignored here."""

    def loss(self, out, batch, net, run):
        """{name: step_loss.Term}: the terms the method adds to eq. 12; none here."""
        return {}

    def end_step(self, run):
        """After the step's last backward (ShifCon: its language vectors take the step's batch means)."""

    def evaluate(self, net, examples, pooled, run):
        """The method's own held-out measures; none here."""
        return {}

    def describe(self, res):
        return ""

    def state_dict(self):
        """What a resumed run needs besides the weights and the optimizer (JSON-able); None: nothing."""
        return None

    def load_state_dict(self, state):
        if state is not None:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds some: written by another method?")

    def export_files(self, out_dir):
        """Paths of files to copy into the Hugging Face export (what inference needs besides the weights)."""
        return []
