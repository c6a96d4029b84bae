// MathJax 3 configuration, read by javascripts/mathjax/tex-mml-chtml.js (copied into the site
// from the django-static-mathjax package by tools/mkdocs_hooks.py, so no network is needed).
// pymdownx.arithmatex (generic) wraps math as \( \) and \[ \] inside class "arithmatex"; a heading's
// math also appears, without that class, in the table of contents (class "md-ellipsis").
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex|md-ellipsis" }
};
// MathJax typesets the page when it starts; a page swapped in later (Material's document$) is
// typeset again once MathJax is ready.
document$.subscribe(() => {
  if (window.MathJax && MathJax.typesetPromise) {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  }
});
