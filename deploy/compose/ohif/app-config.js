/** OHIF 3.13 configuration for radnode: one DICOMweb data source, served from the viewer's own origin.
 *
 * Rendered by radnode/viewer.py (render_app_config): /dicom-web becomes the proxied Orthanc
 * DICOMweb root (default "/dicom-web"), so no CORS is involved. Orthanc's DICOMweb plugin is not a
 * static-WADO server, supports includefield and serves per-frame pixel data.
 * @type {AppTypes.Config}
 */
window.config = {
  name: 'radnode',
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'radnode',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'radnode',
      configuration: {
        friendlyName: 'radnode Orthanc (DICOMweb)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
