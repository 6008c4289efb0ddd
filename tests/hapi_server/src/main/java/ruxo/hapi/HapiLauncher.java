package ruxo.hapi;

import ca.uhn.fhir.batch2.api.IJobMaintenanceService;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.narrative2.NullNarrativeGenerator;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.interceptor.RequestValidatingInterceptor;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import ca.uhn.fhir.validation.IValidatorModule;
import ca.uhn.fhir.validation.ResultSeverityEnum;
import java.io.InputStream;
import java.net.InetSocketAddress;
import java.util.List;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;

/**
 * Starts HAPI FHIR JPA (R4, H2 in memory) in an embedded Jetty for ruxo-fhir's tests.
 *
 * <pre>java -cp 'target/classes:target/lib/*' ruxo.hapi.HapiLauncher [-host H] [-port N]
 *     [-no-client-ids] [-validate] [-exit-on-stdin-close]</pre>
 *
 * FHIR base: http://H:N/fhir. Admin API (never part of FHIR): /$admin/reset, /$admin/config.
 * Once serving, prints one JSON line on stdout:
 * {"event": "listening", "port": N, "base": "http://H:N/fhir"}; logs go to stderr.
 */
public final class HapiLauncher {

    private HapiLauncher() {}

    public static void main(String[] args) throws Exception {
        String host = "127.0.0.1";
        int port = 0;
        boolean validate = false;
        boolean exitOnStdinClose = false;
        for (int i = 0; i < args.length; i++) {
            switch (args[i]) {
                case "-host" -> host = args[++i];
                case "-port" -> port = Integer.parseInt(args[++i]);
                case "-no-client-ids" -> HapiConfig.noClientIds = true;
                case "-validate" -> validate = true;
                case "-exit-on-stdin-close" -> exitOnStdinClose = true;
                default -> {
                    System.err.println("usage: HapiLauncher [-host H] [-port N] [-no-client-ids] [-validate]"
                            + " [-exit-on-stdin-close]; unknown argument " + args[i]);
                    System.exit(2);
                }
            }
        }
        if (exitOnStdinClose) {
            Thread watcher = new Thread(HapiLauncher::exitWhenStdinCloses, "stdin-watcher");
            watcher.setDaemon(true);
            watcher.start();
        }

        AnnotationConfigApplicationContext ctx = new AnnotationConfigApplicationContext(HapiConfig.class);
        RestfulServer fhir = restfulServer(ctx);
        RequestValidatingInterceptor validator = requestValidator(ctx);
        AdminServlet admin = new AdminServlet(ctx, fhir, validator, validate);
        admin.applyDefaults();

        Server server = new Server(new InetSocketAddress(host, port));
        ServletContextHandler handler = new ServletContextHandler();
        handler.setContextPath("/");
        ServletHolder fhirHolder = new ServletHolder("fhir", fhir);
        fhirHolder.setInitOrder(1);
        handler.addServlet(fhirHolder, "/fhir/*");
        handler.addServlet(new ServletHolder("admin", admin), "/$admin/*");
        server.setHandler(handler);
        server.setStopAtShutdown(true);
        server.start();
        int actualPort = ((ServerConnector) server.getConnectors()[0]).getLocalPort();
        String base = "http://" + host + ":" + actualPort + "/fhir";
        System.out.println("{\"event\": \"listening\", \"port\": " + actualPort + ", \"base\": \"" + base + "\"}");
        System.out.flush();
        Runtime.getRuntime().addShutdownHook(new Thread(ctx::close, "spring-close"));
        quickenBatchJobs(ctx);
        server.join();
    }

    /** The REST layer the way a HAPI JPA application assembles it. */
    private static RestfulServer restfulServer(AnnotationConfigApplicationContext ctx) {
        IFhirSystemDao<?, ?> systemDao = ctx.getBean("mySystemDaoR4", IFhirSystemDao.class);
        RestfulServer fhir = new RestfulServer(systemDao.getContext());
        systemDao.getContext().setNarrativeGenerator(new NullNarrativeGenerator());
        fhir.registerProviders(ctx.getBean(ResourceProviderFactory.class).createProviders());
        fhir.registerProvider(ctx.getBean("mySystemProviderR4", JpaSystemProvider.class));
        JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
                fhir,
                systemDao,
                ctx.getBean(JpaStorageSettings.class),
                ctx.getBean(ISearchParamRegistry.class),
                ctx.getBean(IValidationSupport.class));
        capabilities.setImplementationDescription("HAPI FHIR JPA R4 test server (ruxo-fhir tests)");
        fhir.setServerConformanceProvider(capabilities);
        fhir.setDefaultResponseEncoding(EncodingEnum.JSON);
        fhir.setPagingProvider(ctx.getBean(DatabaseBackedPagingProvider.class));
        fhir.registerProvider(ctx.getBean(BulkDataExportProvider.class));
        return fhir;
    }

    /**
     * Batch2 jobs (Bulk Data $export) advance one step per maintenance pass, which HAPI schedules
     * once a minute; an export would take minutes. Trigger a pass every 500 ms instead, as
     * HAPI's own tests do while they wait for a job. Nothing else about the job changes.
     */
    private static void quickenBatchJobs(AnnotationConfigApplicationContext ctx) {
        IJobMaintenanceService maintenance = ctx.getBean(IJobMaintenanceService.class);
        ScheduledExecutorService timer = Executors.newSingleThreadScheduledExecutor(r -> {
            Thread t = new Thread(r, "batch2-maintenance-trigger");
            t.setDaemon(true);
            return t;
        });
        timer.scheduleWithFixedDelay(() -> {
            try {
                maintenance.runMaintenancePass();
            } catch (RuntimeException e) {
                // a pass that fails now is retried on the next tick
            }
        }, 500, 500, TimeUnit.MILLISECONDS);
    }

    /** Request validation on write, as HAPI's own servers do it when switched on. */
    private static RequestValidatingInterceptor requestValidator(AnnotationConfigApplicationContext ctx) {
        RequestValidatingInterceptor interceptor = new RequestValidatingInterceptor();
        interceptor.setFailOnSeverity(ResultSeverityEnum.ERROR);
        interceptor.setValidatorModules(List.of(ctx.getBean(IValidatorModule.class)));
        return interceptor;
    }

    private static void exitWhenStdinCloses() {
        try (InputStream in = System.in) {
            byte[] buf = new byte[256];
            while (in.read(buf) >= 0) {
                // discard
            }
        } catch (Exception ignored) {
            // treat a broken stdin like a closed one
        }
        System.exit(0);
    }
}
