# edgelm package for jetson-containers: `jetson-containers build edgelm`
# (or `edgelm:flashinfer` to add FlashInfer as an attention backend).
#
# EDGELM_REPO (owner/name on GitHub) and EDGELM_BRANCH may be set in the environment of the
# build to install edgelm from another fork or revision.
import os

from jetson_containers import update_dependencies


def edgelm(version, branch=None, depends=None, extras='grammar', suffix='', requires=None, default=False):
    pkg = package.copy()

    pkg['name'] = f'edgelm:{version}{suffix}'

    if requires:
        pkg['requires'] = requires

    if depends:
        pkg['depends'] = update_dependencies(pkg['depends'], depends)

    pkg['build_args'] = {
        'EDGELM_REPO': os.environ.get('EDGELM_REPO', 'edgelm/edgelm'),
        'EDGELM_BRANCH': os.environ.get('EDGELM_BRANCH', branch or 'main'),
        'EDGELM_EXTRAS': extras,
    }

    if default:
        pkg['alias'] = f'edgelm{suffix.replace("-", ":", 1)}'

    return pkg


package = [
    edgelm('0.1.0', default=True),
    edgelm('0.1.0', suffix='-flashinfer', depends=['flashinfer'], extras='grammar,flashinfer', default=True),
]
