// qcourse: glue between the static widget views and the book's own copies of its JavaScript.
// Loaded (through myst-nb's nb_ipywidgets_js, see _config.yml) after require.js and before
// @jupyter-widgets/html-manager's embed-amd.js, on every page that stores widget state.
(function () {
  "use strict";

  // 1. The widget manager's bundles find their assets (the Font Awesome icon fonts) next to the
  //    URL that RequireJS gives their module name, which by default resolves next to the page
  //    (book/@jupyter-widgets/html-manager/dist/...). Map that name to the folder that holds
  //    embed-amd.js and the fonts (html-manager/, a sibling of this script's folder), and set
  //    the override the manager reads for assets it loads later.
  var here = document.currentScript.src.split("?")[0];
  var assets = here.replace(/glue\/[^/]*$/, "html-manager");
  window.requirejs.config({paths: {"@jupyter-widgets/html-manager/dist": assets}});
  window.__jupyter_widgets_assets_path__ = assets + "/";

  // 2. @jupyter-widgets/controls typesets a widget's description with the MathJax 2 API,
  //    MathJax.Hub.Queue(["Typeset", MathJax.Hub, element]), whenever window.MathJax exists.
  //    The book runs MathJax 3, which has no Hub: give every object that becomes window.MathJax
  //    (Sphinx's configuration object, then MathJax 3 itself) a Hub whose Queue typesets the
  //    element with MathJax 3 once MathJax has started.
  function typesetLater(job) {
    var element = job && job[2];
    var mj = current;
    if (!element || !mj || typeof mj.typesetPromise !== "function") {
      return; // MathJax 3 not started yet: its first pass typesets the whole page anyway.
    }
    var ready = (mj.startup && mj.startup.promise) || Promise.resolve();
    ready.then(function () { return mj.typesetPromise([element]); });
  }
  function withHub(value) {
    if (value && typeof value === "object" && !("Hub" in value)) {
      Object.defineProperty(value, "Hub", {
        configurable: true, enumerable: false, value: {Queue: typesetLater},
      });
    }
    return value;
  }
  var current = withHub(window.MathJax);
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    enumerable: true,
    get: function () { return current; },
    set: function (value) { current = withHub(value); },
  });
})();
