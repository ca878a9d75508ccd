"""The built-in checklist files and the schema's error messages for broken ones."""

from collections import Counter

import pytest
import yaml

from magic_align.checklists.schema import BUILTIN_DIR, ChecklistError, builtin_checklists, load_checklists
from magic_align.data.records import REGIONS, normalise_region

# The 20 largest Fitzpatrick17k classes (docs/reproducing-the-paper.md section 1), spelled as the dataset's labels.
PAPER_CONDITIONS = {
    "psoriasis", "squamous cell carcinoma", "lichen planus", "basal cell carcinoma", "allergic contact dermatitis",
    "lupus erythematosus", "sarcoidosis", "folliculitis", "scabies", "melanoma", "erythema multiforme",
    "granuloma annulare", "eczema", "pityriasis rosea", "acne", "mycosis fungoides", "actinic keratosis",
    "prurigo nodularis", "vitiligo", "keloid",
}
VARIANTS = {"fitzpatrick20": 5, "fitzpatrick20-coarse": 1, "fitzpatrick20-fine": 9}


@pytest.mark.parametrize("name", builtin_checklists())
def test_every_builtin_file_loads(name):
    checklists = load_checklists(name)
    assert checklists.id == name and len(checklists.conditions) >= 1
    for checklist in checklists.conditions:  # regions must be usable by same-region target selection
        assert checklist.region is None or normalise_region(checklist.region) in REGIONS, checklist.region


@pytest.mark.parametrize("name, per_condition", VARIANTS.items())
def test_fitzpatrick_variants_cover_the_papers_20_conditions(name, per_condition):
    checklists = load_checklists(name)
    assert set(checklists.condition_names) == PAPER_CONDITIONS
    assert {len(c.items) for c in checklists.conditions} == {per_condition}
    for checklist in checklists.conditions:
        assert checklist.token.startswith("<") and checklist.token.endswith(">") and " " not in checklist.token
        assert checklist.region in REGIONS
        for item in checklist.items:
            assert item.text.endswith(".") and len(item.text) < 200, (checklist.condition, item.id)


def test_variants_share_tokens_and_regions():
    # A run may switch checklist variants without retraining: the prompt token must stay the same.
    base = load_checklists("fitzpatrick20")
    for name in VARIANTS:
        other = load_checklists(name)
        assert {c.condition: (c.token, c.region) for c in other.conditions} == \
            {c.condition: (c.token, c.region) for c in base.conditions}


def test_five_aspects_in_order_and_requires_point_at_the_lesion_item():
    checklists = load_checklists("fitzpatrick20")
    for checklist in checklists.conditions:
        assert [i.aspect for i in checklist.items] == ["location", "lesion type", "shape and size", "colour", "texture"]
    gated = [(c.condition, i.id, i.requires) for c in checklists.conditions for i in c.items if i.requires]
    assert 0 < len(gated) <= 8  # sparingly
    assert all(parent == "lesion" for _, _, parent in gated)


def test_colour_items_speak_of_darker_skin():
    checklists = load_checklists("fitzpatrick20")
    colour = [next(i for i in c.items if i.id == "colour") for c in checklists.conditions]
    mentions = [item.text for item in colour if "darker skin" in item.text]
    assert len(mentions) >= 12


def test_same_region_selection_has_company_in_every_region():
    regions = Counter(c.region for c in load_checklists("fitzpatrick20").conditions)
    assert set(regions) <= set(REGIONS)
    assert all(count >= 2 for region, count in regions.items() if region != "anywhere")


def test_apply_requires_fails_a_child_whose_parent_failed():
    psoriasis = load_checklists("fitzpatrick20")["psoriasis"]
    assert [i.id for i in psoriasis.items] == ["location", "lesion", "shape", "colour", "texture"]
    assert psoriasis.apply_requires([1, 0, 1, 1, 1]) == [1, 0, 1, 1, 0]
    assert psoriasis.apply_requires([1, 1, 1, 1, 1]) == [1, 1, 1, 1, 1]


# ------------------------------------------------------------------------------------------ versions
def _reordered(node):
    """The same content with every mapping's keys in reverse order (a different file, the same checklist)."""
    if isinstance(node, dict):
        return {key: _reordered(node[key]) for key in reversed(list(node))}
    if isinstance(node, list):
        return [_reordered(value) for value in node]
    return node


def test_versions_are_stable_across_loads_and_formatting(tmp_path):
    first = {c.condition: c.version for c in load_checklists("fitzpatrick20").conditions}
    again = {c.condition: c.version for c in load_checklists("fitzpatrick20").conditions}
    data = yaml.safe_load((BUILTIN_DIR / "fitzpatrick20.yaml").read_text())
    path = tmp_path / "copy.yaml"
    path.write_text(yaml.safe_dump(_reordered(data), default_flow_style=True, width=60))
    copied = {c.condition: c.version for c in load_checklists(path).conditions}
    assert first == again == copied
    assert len(set(first.values())) == 20


def test_an_edit_changes_only_that_conditions_version(tmp_path):
    data = yaml.safe_load((BUILTIN_DIR / "fitzpatrick20.yaml").read_text())
    before = {c.condition: c.version for c in load_checklists("fitzpatrick20").conditions}
    target = next(c for c in data["conditions"] if c["condition"] == "keloid")
    target["items"][3]["text"] = target["items"][3]["text"].replace("pink", "rose")
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data))
    after = {c.condition: c.version for c in load_checklists(path).conditions}
    assert after["keloid"] != before["keloid"]
    assert {k: v for k, v in after.items() if k != "keloid"} == {k: v for k, v in before.items() if k != "keloid"}


# ------------------------------------------------------------------------------------------ broken files
def _write(tmp_path, items, token="<psoriasis>"):
    data = {"id": "broken", "conditions": [
        {"condition": "acne", "display_name": "Acne", "token": "<acne>",
         "items": [{"id": "lesion", "aspect": "lesion type", "text": "There are bumps."}]},
        {"condition": "psoriasis", "display_name": "Psoriasis", "token": token, "items": items},
    ]}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


GOOD = [{"id": "lesion", "aspect": "lesion type", "text": "There are plaques."},
        {"id": "scale", "aspect": "texture", "text": "The plaques carry silvery scale.", "requires": "lesion"}]


def test_good_file_loads(tmp_path):
    assert load_checklists(_write(tmp_path, GOOD))["psoriasis"].items[1].requires == "lesion"


def test_duplicate_item_ids_name_file_condition_and_item(tmp_path):
    items = [GOOD[0], dict(GOOD[1], id="lesion", requires=None)]
    with pytest.raises(ChecklistError) as error:
        load_checklists(_write(tmp_path, items))
    message = str(error.value)
    assert "broken.yaml" in message and "condition psoriasis" in message and "repeated: ['lesion']" in message


def test_missing_text_names_file_condition_and_item(tmp_path):
    items = [GOOD[0], {"id": "scale", "aspect": "texture"}]
    with pytest.raises(ChecklistError) as error:
        load_checklists(_write(tmp_path, items))
    message = str(error.value)
    assert "broken.yaml" in message and "condition psoriasis, item 2 (scale), field text" in message


def test_requires_on_an_unknown_item_is_named(tmp_path):
    items = [GOOD[0], dict(GOOD[1], requires="plaque")]
    with pytest.raises(ChecklistError) as error:
        load_checklists(_write(tmp_path, items))
    message = str(error.value)
    assert "broken.yaml" in message and "condition psoriasis" in message
    assert "item 'scale' requires 'plaque', which is not an item of 'psoriasis'" in message


def test_token_with_spaces_is_named(tmp_path):
    with pytest.raises(ChecklistError) as error:
        load_checklists(_write(tmp_path, GOOD, token="<psoriasis plaque>"))
    message = str(error.value)
    assert "broken.yaml" in message and "condition psoriasis, field token" in message and "without spaces" in message


def test_duplicate_tokens_and_unknown_sets_are_errors(tmp_path):
    with pytest.raises(ChecklistError, match=r"each token must appear once; repeated: \['<acne>'\]"):
        load_checklists(_write(tmp_path, GOOD, token="<acne>"))
    with pytest.raises(ChecklistError, match="no checklist set named 'fitzpatrick21'"):
        load_checklists("fitzpatrick21")
    (tmp_path / "bad.yaml").write_text("id: x\nconditions: [\n")
    with pytest.raises(ChecklistError, match="bad.yaml is not valid YAML"):
        load_checklists(tmp_path / "bad.yaml")
