// Counts the images that loaded and marks those that did not: the page's own check that every
// embedded image is intact (data-images-loaded / data-images-failed on the body, and a banner on failure).
window.addEventListener("load", function () {
  var images = document.images, ok = 0;
  for (var i = 0; i < images.length; i++) {
    var im = images[i];
    if (im.complete && im.naturalWidth > 0) { ok++; } else { im.classList.add("img-failed"); }
  }
  var failed = images.length - ok;
  document.body.dataset.imagesLoaded = ok + "/" + images.length;
  document.body.dataset.imagesFailed = String(failed);
  if (failed > 0) {
    var note = document.getElementById("img-failures");
    note.textContent = failed + " of " + images.length + " images failed to load";
    note.hidden = false;
  }
});
