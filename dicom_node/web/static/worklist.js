// dicom-node worklist: the only script of the pages (no framework, no build step).
// 1. The worklist reloads itself every data-refresh-s seconds, except while the user types in the filter.
// 2. Admin action forms ask for confirmation (data-confirm) before they post.
(function () {
  "use strict";
  var seconds = parseInt(document.body.getAttribute("data-refresh-s") || "0", 10);
  if (seconds > 0) {
    var typing = false;
    document.addEventListener("focusin", function (e) { typing = e.target && e.target.tagName === "INPUT"; });
    document.addEventListener("focusout", function () { typing = false; });
    setInterval(function () { if (!typing) { window.location.reload(); } }, seconds * 1000);
  }
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (e) {
      if (!window.confirm(form.getAttribute("data-confirm"))) { e.preventDefault(); }
    });
  });
})();
