"""Common English words that start sentences but are not names.

Rule extraction reads a capitalised word as a name. At the start of a sentence every
word is capitalised, so there a single word counts as a name only when it is not one of
these (and is not shaped like a common word: see ``looks_common`` in extraction), unless
the same text also writes it capitalised in the middle of a sentence. Lower case, ASCII.
"""

from __future__ import annotations

__all__ = ["COMMON_WORDS"]

COMMON_WORDS = frozenset(
    """
    a about above across actually add added adding after afternoon again against ah ahead all almost alone
    along already alright although always amazing among and another answer any anybody anyone anything
    anyway anyways anywhere apparently are area around as ask asked asking at autumn avoid aw away awesome
    awful back bad badly basically be beautiful because become been before behind being believe below
    best better between big bit bold book booked born both bought brave breakfast brief bring brilliant
    brought budget busy but buy by call called calm can cannot careful catching caught certain certainly
    chances change changed cheap check checked cheers child children choose chose clean clear clearly
    clinical close cold come comes coming congrats congratulations consider cool could couple course cute
    daily damn day days dear decided decision decisions definitely delicious did different dinner do does
    doing done double down drink drove during each early easy eat eating either else end enjoy enough
    entire especially even evening eventually ever every everybody everyone everything everywhere
    exactly excellent except excited exciting expensive fair fairly family famous fantastic far fast
    feel feeling feels felt few fine finally find finished first food for forget forgot found free
    fresh friday friends from full fun funny further gave get gets getting give glad go goes going gone
    good got great guess had half happy hard has hate have having hello help helpful her here hey hi
    high his home honestly hope hopefully hot how however huge i idea if important in indeed initially
    inside instead interesting interestingly is it just keep keeping kind kinda kept knew know large last
    late lately later least leave left less let lets life like likely little live long look looked
    looking looks lost lots love lovely low luckily lunch made main make makes making many maybe meant
    meanwhile measured meet meeting met might mine minor miss missed money month months more morning most
    mostly move moved much must my name near nearly need needed needs never new news next nice night
    nights no nobody none nope normally not nothing noted now of off oh ok okay old on once one only
    oops open or other others otherwise ouch our out outside over own packed packing paid parking part
    past pay people perfect perhaps personally pick picked plan planned planning play please plenty
    plus poor possibly pretty probably quick quickly quite rather read ready real really recently right
    rough sad sadly safe said same saw say says see seems seen sent serious seriously service set several
    she short should show shows sick simple simply since sleep slept slightly slow small so some somebody
    someone something sometimes somewhat soon sorry sound sounds speaking start started still stop
    strange such suddenly super sure surely surprisingly sweet take taking talk talked tell than thank
    thanks that the their them then there therefore these they thing things think this those though
    thought three through thus time tiny tired to today together told tomorrow tonight too took total
    totally tough tried true truly try trying turn turned turns twice two ugh under unfortunately
    unless until up upon us use used useful usual usually very wait want wanted wants was watch way we
    weekend weekly welcome well went were what whatever when whenever where whether which while who
    whoever whole why will wish with within without wonder wonderful work worked working works worried
    worry worse worst would wow yay yeah year years yes yesterday yet you young your yours yup zero
    four five six seven eight nine ten eleven twelve twenty thirty hundred thousand million second third
    alas anyhow besides hmm huh indeed nah oof sigh whoa yikes goodbye bye crazy evening morning
    animals baby beach birthday body breakfast car cat cats coffee dog dogs dinner doctor exam friend
    game games garden gym health holiday house job kids kitchen lunch meeting meetings music news office
    party pets plans rain rent restaurant school shift shifts snow sports summer team tea traffic
    travel trip vacation weather winter work
    """.split()
)
