// Keyboard for the review page. Everything also works without this script (plain links, forms, checkboxes).
// Digits toggle checklist items (0 = item 10), Enter saves and moves on, arrows move without saving,
// n focuses the note, Esc leaves it. Keys typed into a text field stay in that field.
(function () {
  "use strict";

  function typing(target) {
    if (!target || !target.tagName) return false;
    var tag = target.tagName.toLowerCase();
    if (tag === "textarea" || tag === "select") return true;
    return tag === "input" && target.type !== "checkbox" && target.type !== "radio";
  }

  function follow(id) {
    var link = document.getElementById(id);
    if (link && link.href) window.location.assign(link.href);
  }

  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    var form = document.getElementById("review-form");
    var target = event.target;

    if (typing(target)) {
      if (event.key === "Escape") target.blur();
      return; // Enter in the note submits the form natively
    }

    if (!form) {
      // queue page: Enter opens the next unreviewed image
      var start = document.getElementById("start");
      if (event.key === "Enter" && start && !(target && target.tagName && target.tagName.toLowerCase() === "a")) {
        event.preventDefault();
        window.location.assign(start.href);
      }
      return;
    }

    if (/^[0-9]$/.test(event.key)) {
      var number = event.key === "0" ? 10 : Number(event.key);
      var box = document.getElementById("item-" + number);
      if (box) {
        event.preventDefault();
        box.checked = !box.checked;
      }
    } else if (event.key === "Enter") {
      var tag = target && target.tagName ? target.tagName.toLowerCase() : "";
      if (tag === "a" || tag === "button") return; // let the focused link or button do its own thing
      event.preventDefault();
      form.requestSubmit();
    } else if (event.key === "ArrowRight") {
      event.preventDefault();
      follow("next");
    } else if (event.key === "ArrowLeft") {
      event.preventDefault();
      follow("previous");
    } else if (event.key === "n") {
      var note = document.getElementById("note");
      if (note) {
        event.preventDefault();
        note.focus();
      }
    }
  });
})();
