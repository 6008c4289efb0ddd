package ruxo.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.HibernatePropertiesProvider;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import jakarta.persistence.EntityManagerFactory;
import java.util.HashMap;
import java.util.Map;
import java.util.UUID;
import javax.sql.DataSource;
import org.apache.commons.dbcp2.BasicDataSource;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

/**
 * The Spring wiring of the JPA server: HAPI's own R4 JPA configuration plus the beans an
 * application must supply (database, entity manager, transactions, storage settings), and the
 * Batch2 job framework so Bulk Data $export works. H2 in memory: nothing survives a stop.
 */
@Configuration
@Import({
    ThreadPoolFactoryConfig.class,
    JpaR4Config.class,
    HapiJpaConfig.class,
    SubscriptionChannelConfig.class,
    JpaBatch2Config.class,
    Batch2JobsConfig.class
})
public class HapiConfig {

    /** Options from the command line, set by {@link HapiLauncher} before the context starts. */
    static boolean noClientIds = false;

    @Bean
    public DataSource dataSource() {
        BasicDataSource ds = new BasicDataSource();
        ds.setDriverClassName("org.h2.Driver");
        // a fresh named in-memory database per process, kept while the pool has connections
        ds.setUrl("jdbc:h2:mem:hapi-" + UUID.randomUUID() + ";DB_CLOSE_DELAY=-1");
        ds.setUsername("sa");
        ds.setPassword("");
        ds.setMaxTotal(20);
        return ds;
    }

    @Bean
    public JpaStorageSettings storageSettings() {
        JpaStorageSettings s = new JpaStorageSettings();
        applyDefaults(s);
        return s;
    }

    /** The settings every reset returns to (see {@link AdminServlet}). */
    static void applyDefaults(JpaStorageSettings s) {
        s.setResourceClientIdStrategy(noClientIds
                ? JpaStorageSettings.ClientIdStrategyEnum.NOT_ALLOWED
                : JpaStorageSettings.ClientIdStrategyEnum.ALPHANUMERIC);
        // tests reset the server between cases: delete/expunge must be allowed
        s.setAllowMultipleDelete(true);
        s.setExpungeEnabled(true);
        s.setDeleteExpungeEnabled(true);
        // a search cached before a reset must never answer after it
        s.setReuseCachedSearchResultsForMillis(null);
        // every $export kick-off is a new job (a reused job would describe a reset repository)
        s.setEnableBulkExportJobReuse(false);
    }

    @Bean
    public PartitionSettings partitionSettings() {
        return new PartitionSettings();
    }

    @Bean
    public SubscriptionSettings subscriptionSettings() {
        return new SubscriptionSettings();
    }

    @Bean
    public IBinaryStorageSvc binaryStorageSvc() {
        return new DatabaseBinaryContentStorageSvcImpl();
    }

    @Primary
    @Bean
    public LocalContainerEntityManagerFactoryBean entityManagerFactory(
            ConfigurableListableBeanFactory beanFactory,
            FhirContext fhirContext,
            JpaStorageSettings storageSettings,
            DataSource dataSource) {
        LocalContainerEntityManagerFactoryBean emf =
                HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
        emf.setPersistenceUnitName("HAPI_PU");
        emf.setDataSource(dataSource);
        Map<String, Object> props = new HashMap<>();
        props.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
        props.put("hibernate.hbm2ddl.auto", "update");
        props.put("hibernate.archive.scanner", "org.hibernate.boot.archive.scan.internal.DisabledScanner");
        props.put("hibernate.physical_naming_strategy",
                "org.hibernate.boot.model.naming.CamelCaseToUnderscoresNamingStrategy");
        props.put("hibernate.format_sql", "false");
        props.put("hibernate.show_sql", "false");
        props.put("hibernate.jdbc.batch_size", "20");
        props.put("hibernate.cache.use_query_cache", "false");
        props.put("hibernate.cache.use_second_level_cache", "false");
        props.put("hibernate.cache.use_structured_entries", "false");
        props.put("hibernate.cache.use_minimal_puts", "false");
        props.put("hibernate.search.enabled", "false");
        emf.setJpaPropertyMap(props);
        return emf;
    }

    @Primary
    @Bean
    public JpaTransactionManager transactionManager(EntityManagerFactory emf) {
        JpaTransactionManager tm = new JpaTransactionManager();
        tm.setEntityManagerFactory(emf);
        return tm;
    }

    @Primary
    @Bean
    public HibernatePropertiesProvider hibernatePropertiesProvider() {
        HibernatePropertiesProvider p = new HibernatePropertiesProvider();
        p.setDialectForUnitTest(new HapiFhirH2Dialect());
        return p;
    }
}
